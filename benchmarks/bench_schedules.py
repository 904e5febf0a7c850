"""Schedules x solvers on exact flows, at equal NFE: every ComfyUI built-in scheduler and ours.

Data: four Gaussian mixtures (benchmarks/exact_flow.py) whose flow-matching velocity is exact, and
a DOP853 reference solve (tolerance 1e-10) for each noise sample. Time convention: ComfyUI sigma
(1 = noise, 0 = data), ``x = (1 - sigma) x0 + sigma eps``.

Schedules come from ComfyUI's own ``comfy.samplers.calculate_sigmas`` on a ``ModelSamplingDiscreteFlow``
with **shift 1** (multiplier 1, the Lumina/Z-Image convention): the mixtures are low-dimensional
"native resolution" data, for which no shift is appropriate (shift 3 made every schedule worse on
them), and shift 1 keeps the built-ins and ours on the same unwarped sigma interval — ``simple``,
``normal``, ``beta`` ... read the shift from the model's sigma table exactly as ``lt_sigmoid`` and
``lt_anchor`` do. Our ``lt_sigmoid`` / ``lt_anchor`` go through the same call (their stock-list
handlers), so at shift 1 ``lt_anchor`` is the uniform schedule.

Solvers are ComfyUI's own functions (``comfy.samplers.ksampler(name).sampler_function``: euler, heun,
dpmpp_2m and our registered flow_midpoint) plus flow_midpoint with an Euler final step (the
LTFlowMidpointSampler node's option), called on the exact denoiser. Equal NFE means equal *model
calls*: for each budget every method gets the most steps whose counted calls fit (euler/dpmpp_2m:
NFE steps; heun: its last step is Euler, so NFE/2 steps cost NFE - 1 at even budgets; midpoint: NFE/2).
The starting state is ComfyUI's ``noise_scaling(sigmas[0], noise, empty latent)``, so a schedule that
starts below 1 pays for it.

Scores (geometric mean over the mixtures): RMS terminal error against the exact endpoints, and sliced
Wasserstein-2 distance to fresh data samples (its floor is the reference solution's own distance).

Sigmoid sweep: the same measurement for ``sigmoid_sigmas`` over a small slope x center grid (slope 0 is the
uniform schedule, for every center), solvers euler / heun / dpmpp_2m / flow_midpoint, every NFE budget;
each setting's terminal error is reported relative to uniform with the same solver and budget. The defaults
of LTSigmoidScheduler / ``lt_sigmoid`` and what the docs say about them come from this table.

Fitted samplers (LTFitSampler, samplers/fitting.py): benchmarks/fitted_exact_flow.py (the same mixtures,
each with its own shift 1 or 3, against every built-in scheduler x ODE sampler at that shift and in hindsight
over shifts) and benchmarks/fitted_nextdit.py (a tiny random NextDiT through the real nodes).
About two minutes on 2 CPU cores without the fitted part; the fits take tens of minutes.
"""

from __future__ import annotations

import math

import torch

NFE_BUDGETS = (4, 6, 8, 10, 16, 30)
SAMPLES = 512
MIXTURES = {  # name -> make_mixture keyword arguments
    "8-d, 6 components": dict(dim=8, components=6, std_range=(0.05, 0.3), seed=0),
    "8-d, sharp (std .01-.05)": dict(dim=8, components=6, std_range=(0.01, 0.05), seed=1),
    "16-d, broad (std .2-.6)": dict(dim=16, components=6, std_range=(0.2, 0.6), seed=2),
    "32-d, 10 components": dict(dim=32, components=10, std_range=(0.05, 0.3), seed=3),
}
BUILTIN_SOLVERS = ("euler", "heun", "dpmpp_2m")
OUR_SOLVERS = ("flow_midpoint", "flow_midpoint (euler end)")
OUR_SCHEDULERS = ("lt_sigmoid", "lt_anchor")
SWEEP_SLOPES = (1.0, 2.0, 3.0, 4.0)  # and 0 = uniform
SWEEP_CENTERS = (0.4, 0.5, 0.6)
SWEEP_SOLVERS = ("euler", "heun", "dpmpp_2m", "flow_midpoint")


def _setup():

    from lumina_turbo.devtools.comfy_host import bootstrap

    bootstrap()


def _flow_model_sampling(shift: float = 1.0):
    import comfy.model_sampling

    class FlowSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    model_sampling = FlowSampling()
    model_sampling.set_parameters(shift=shift, multiplier=1.0)
    return model_sampling


def _solvers() -> dict:
    import comfy.samplers

    from lumina_turbo.nodes.schedules import LTFlowMidpointSampler

    ksamplers = {name: comfy.samplers.ksampler(name) for name in BUILTIN_SOLVERS + ("flow_midpoint",)}
    ksamplers["flow_midpoint (euler end)"] = LTFlowMidpointSampler.execute("euler").args[0]

    def as_function(ksampler):
        def sampler(model, x, sigmas, disable=True):
            return ksampler.sampler_function(
                model, x, sigmas, extra_args={}, callback=None, disable=disable, **ksampler.extra_options
            )

        return sampler

    return {name: as_function(k) for name, k in ksamplers.items()}


def _calls(sampler, sigmas) -> int:
    from lumina_turbo.samplers.flow_solvers import count_model_calls

    counted = count_model_calls(lambda x, sigma, **kwargs: torch.zeros_like(x))
    sampler(counted, torch.ones(1, 1, dtype=torch.float64), sigmas.to(torch.float64))
    return counted.calls


def _largest_schedule(sampler, make_sigmas, budget: int):
    """The most steps (requested from the scheduler) whose counted model calls fit ``budget``."""
    for steps in range(budget, 0, -1):
        sigmas = make_sigmas(steps)
        if _calls(sampler, sigmas) <= budget:
            return steps, sigmas
    return None, None


def _geomean(values) -> float:
    return math.exp(sum(math.log(max(v, 1e-300)) for v in values) / len(values))


def _problems():
    from lumina_turbo.benchmarks.exact_flow import make_mixture, reference_solution, sliced_wasserstein

    problems = {}
    for name, kwargs in MIXTURES.items():
        mixture = make_mixture(**kwargs)
        noise = torch.randn(
            SAMPLES, mixture.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
        )
        reference = reference_solution(mixture, noise)
        data = mixture.sample(SAMPLES, generator=torch.Generator().manual_seed(1))
        problems[name] = dict(
            mixture=mixture,
            noise=noise,
            reference=reference,
            data=data,
            reference_sw=sliced_wasserstein(reference, data),
        )
    return problems


def _stock_schedules(model_sampling, names) -> dict:
    """name -> steps -> sigmas, through ComfyUI's own ``calculate_sigmas`` (ours via their stock handlers)."""
    import comfy.samplers

    def make(name):
        return lambda steps: comfy.samplers.calculate_sigmas(model_sampling, name, steps).to(torch.float64)

    return {name: make(name) for name in names}


def sweep_settings() -> list[tuple[float, float]]:
    """(slope, center) of the sigmoid sweep: uniform once, then the grid."""
    return [(0.0, 0.5)] + [(slope, center) for slope in SWEEP_SLOPES for center in SWEEP_CENTERS]


def _sweep_name(slope: float, center: float) -> str:
    return f"sigmoid slope {slope:g} center {center:g}"


def _sweep_schedules() -> dict:
    from lumina_turbo.samplers.schedules import sigmoid_sigmas

    def make(slope, center):  # shift 1, as lt_sigmoid gets from the bench's model_sampling
        return lambda steps: sigmoid_sigmas(steps, slope=slope, center=center, shift=1.0).to(torch.float64)

    return {_sweep_name(slope, center): make(slope, center) for slope, center in sweep_settings()}


def _measure(problems, model_sampling, solvers, schedules) -> list[dict]:
    from lumina_turbo.benchmarks.exact_flow import evaluate_sampler

    rows = []
    for budget in NFE_BUDGETS:
        for scheduler, make_sigmas in schedules.items():
            for solver_name, sampler in solvers.items():
                steps, sigmas = _largest_schedule(sampler, make_sigmas, budget)
                if steps is None:
                    continue
                per_mixture = {}
                for name, p in problems.items():
                    start = model_sampling.noise_scaling(sigmas[0], p["noise"], torch.zeros_like(p["noise"]))
                    result = evaluate_sampler(sampler, p["mixture"], sigmas, start, p["reference"], p["data"])
                    per_mixture[name] = {k: result[k] for k in ("terminal_error", "sliced_wasserstein")}
                    nfe = result["nfe"]
                    assert nfe <= budget, (scheduler, solver_name, budget, nfe)
                rows.append(
                    {
                        "nfe_budget": budget,
                        "nfe": nfe,
                        "scheduler": scheduler,
                        "solver": solver_name,
                        "steps_requested": steps,
                        "intervals": len(sigmas) - 1,
                        "first_sigma": float(sigmas[0]),
                        "terminal_error": _geomean([m["terminal_error"] for m in per_mixture.values()]),
                        "sliced_wasserstein": _geomean(
                            [m["sliced_wasserstein"] for m in per_mixture.values()]
                        ),
                        "per_mixture": per_mixture,
                    }
                )
    return rows


def _sweep_summary(sweep_rows) -> list[dict]:
    """Per (slope, center) and solver: terminal error / uniform's at each NFE, their geometric mean and the
    worst; plus the geometric mean over every solver and budget ("all")."""
    error = {(r["scheduler"], r["solver"], r["nfe_budget"]): r["terminal_error"] for r in sweep_rows}
    uniform = _sweep_name(0.0, 0.5)
    summary = []
    for slope, center in sweep_settings():
        name = _sweep_name(slope, center)
        entry = {"slope": slope, "center": center, "solvers": {}}
        every = []
        for solver in SWEEP_SOLVERS:
            ratios = {n: error[(name, solver, n)] / error[(uniform, solver, n)] for n in NFE_BUDGETS}
            every += ratios.values()
            entry["solvers"][solver] = {
                "ratio_to_uniform": ratios,
                "geomean": _geomean(ratios.values()),
                "worst": max(ratios.values()),
            }
        entry["geomean_all"] = _geomean(every)
        entry["worse_than_uniform"] = sum(r > 1 for r in every)
        summary.append(entry)
    return summary


def _sweep_table(sweep) -> str:
    lines = [
        "Sigmoid sweep: terminal error relative to uniform (slope 0), same solver and NFE; each cell = "
        f"geometric mean over NFE {', '.join(map(str, NFE_BUDGETS))} / worst single budget; lower is better.",
        "",
        "| slope | center | " + " | ".join(SWEEP_SOLVERS) + " | all | budgets worse than uniform |",
        "|---:|---:|" + "---:|" * (len(SWEEP_SOLVERS) + 2),
    ]
    for entry in sweep[1:]:
        cells = [
            f"{entry['solvers'][s]['geomean']:.3f} / {entry['solvers'][s]['worst']:.3f}"
            for s in SWEEP_SOLVERS
        ]
        lines.append(
            f"| {entry['slope']:g} | {entry['center']:g} | "
            + " | ".join(cells)
            + f" | {entry['geomean_all']:.3f} "
            f"| {entry['worse_than_uniform']} of {len(SWEEP_SOLVERS) * len(NFE_BUDGETS)} |"
        )
    return "\n".join(lines)


def _is_ours(row) -> bool:
    return row["scheduler"] in OUR_SCHEDULERS or row["solver"] in OUR_SOLVERS


def _summary(rows) -> list[dict]:
    summary = []
    for budget in NFE_BUDGETS:
        at = [r for r in rows if r["nfe_budget"] == budget]
        builtin = min((r for r in at if not _is_ours(r)), key=lambda r: r["terminal_error"])
        ours = min((r for r in at if _is_ours(r)), key=lambda r: r["terminal_error"])
        ours_midpoint = min(
            (r for r in at if r["solver"] == "flow_midpoint"), key=lambda r: r["terminal_error"]
        )
        summary.append(
            {
                "nfe": budget,
                "best_builtin": {k: builtin[k] for k in ("scheduler", "solver", "nfe", "terminal_error")},
                "best_ours": {k: ours[k] for k in ("scheduler", "solver", "nfe", "terminal_error")},
                "best_flow_midpoint": {
                    k: ours_midpoint[k] for k in ("scheduler", "solver", "nfe", "terminal_error")
                },
                "ours_over_builtin": ours["terminal_error"] / builtin["terminal_error"],
            }
        )
    return summary


def _tables(rows, summary, problems) -> str:
    lines = [
        "Exact-flow benchmark, terminal error (RMS vs exact endpoints, geometric mean over 4 Gaussian "
        "mixtures; lower is better). Built-in = ComfyUI scheduler x {euler, heun, dpmpp_2m}; ours = an "
        "lt_* schedule or a flow_midpoint solver. NFE = counted model calls.",
        "",
        "| NFE | best built-in | error | best of ours | error | ours / built-in | best flow_midpoint | error |",
        "|---:|---|---:|---|---:|---:|---|---:|",
    ]
    for s in summary:
        b, o, m = s["best_builtin"], s["best_ours"], s["best_flow_midpoint"]
        lines.append(
            f"| {s['nfe']} | {b['scheduler']} + {b['solver']} ({b['nfe']}) | {b['terminal_error']:.4f} "
            f"| {o['scheduler']} + {o['solver']} ({o['nfe']}) | {o['terminal_error']:.4f} "
            f"| {s['ours_over_builtin']:.3f} | {m['scheduler']} ({m['nfe']}) | {m['terminal_error']:.4f} |"
        )
    for metric, title in (
        ("terminal_error", "Terminal error"),
        ("sliced_wasserstein", "Sliced Wasserstein-2 to data"),
    ):
        lines += [
            "",
            f"{title} per scheduler + solver (geometric mean; columns are NFE budgets; * = ours)",
            "",
        ]
        if metric == "sliced_wasserstein":
            floor = _geomean([p["reference_sw"] for p in problems.values()])
            lines[-2] += f"; floor (exact solution vs data): {floor:.4f}"
        lines.append("| scheduler | solver | " + " | ".join(str(n) for n in NFE_BUDGETS) + " |")
        lines.append("|---|---|" + "---:|" * len(NFE_BUDGETS))
        keys = sorted(
            {(r["scheduler"], r["solver"]) for r in rows}, key=lambda k: (k[0] in OUR_SCHEDULERS, k[0], k[1])
        )
        best = {n: min(r[metric] for r in rows if r["nfe_budget"] == n) for n in NFE_BUDGETS}
        for scheduler, solver in keys:
            cells = []
            for n in NFE_BUDGETS:
                match = [
                    r
                    for r in rows
                    if (r["scheduler"], r["solver"], r["nfe_budget"]) == (scheduler, solver, n)
                ]
                value = f"{match[0][metric]:.4f}" if match else "-"
                cells.append(f"**{value}**" if match and match[0][metric] == best[n] else value)
            mark = "*" if scheduler in OUR_SCHEDULERS or solver in OUR_SOLVERS else ""
            lines.append(f"| {scheduler} | {solver}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run() -> dict:
    """Run the benchmark; returns the rows, a per-NFE summary and the markdown tables."""
    _setup()
    import comfy.samplers

    from lumina_turbo.benchmarks import fitted_exact_flow, fitted_nextdit
    from lumina_turbo.patches.stock_lists import SCHEDULER_NAMES as OURS
    from lumina_turbo.patches.stock_lists import register_stock_names

    register_stock_names()
    builtin = [name for name in comfy.samplers.SCHEDULER_NAMES if name not in OURS]
    schedulers = builtin + list(OUR_SCHEDULERS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only contend (5x slower on a busy 2-core box)
    try:
        problems = _problems()
        model_sampling = _flow_model_sampling(1.0)
        solvers = _solvers()
        rows = _measure(problems, model_sampling, solvers, _stock_schedules(model_sampling, schedulers))
        sweep_solvers = {name: solvers[name] for name in SWEEP_SOLVERS}
        sweep_rows = _measure(problems, model_sampling, sweep_solvers, _sweep_schedules())
        fitted = fitted_exact_flow.run()
        fitted_tiny = fitted_nextdit.run()
    finally:
        torch.set_num_threads(threads)
    summary = _summary(rows)
    sweep = _sweep_summary(sweep_rows)
    # the sweep's default setting is lt_sigmoid itself: the two measurements must agree
    default = {
        (r["solver"], r["nfe_budget"]): r["terminal_error"] for r in rows if r["scheduler"] == "lt_sigmoid"
    }
    for r in sweep_rows:
        if r["scheduler"] == _sweep_name(2.0, 0.5):
            assert math.isclose(r["terminal_error"], default[(r["solver"], r["nfe_budget"])], rel_tol=1e-9)
    return {
        "description": "exact-flow benchmark: terminal error and sliced W2 at equal NFE (model calls)",
        "model_sampling": "ModelSamplingDiscreteFlow, shift 1, multiplier 1",
        "mixtures": {
            name: {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
            for name, kw in MIXTURES.items()
        },
        "samples_per_mixture": SAMPLES,
        "reference_sliced_wasserstein": {name: p["reference_sw"] for name, p in problems.items()},
        "builtin_schedulers": builtin,
        "summary": summary,
        "rows": rows,
        "sigmoid_sweep": {
            "slopes": [0.0, *SWEEP_SLOPES],
            "centers": list(SWEEP_CENTERS),
            "solvers": list(SWEEP_SOLVERS),
            "summary": sweep,
            "rows": sweep_rows,
        },
        "fitted": fitted,
        "fitted_nextdit": fitted_tiny,
        "table": _tables(rows, summary, problems)
        + "\n\n"
        + _sweep_table(sweep)
        + "\n\n"
        + fitted["table"]
        + "\n\n"
        + fitted_tiny["table"],
    }
