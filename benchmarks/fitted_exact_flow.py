"""Fitted few-step samplers (samplers/fitting.py) against every built-in pair, on exact flows.

Part of ``python -m benchmarks schedules``. Time convention: ComfyUI sigma (1 = noise, 0 = data).

A "model" here is one Gaussian mixture of bench_schedules.MIXTURES (exact denoiser) together with its
own time shift, 1 or 3 (ModelSamplingDiscreteFlow); the fit starts from that model's default schedule
(``simple`` at its shift) and computes its own fine-step reference (fit_sampler's default), so its cost
is what a real model would pay. Every score is measured on held-out noise (seed 0, HELD_OUT_SAMPLES) that
the fit never saw, against the exact DOP853 endpoints: the mean per-sample relative terminal error
``||x - x_exact|| / ||x_exact||`` at equal model calls. Both noise sets are large because that mean is set
in part by rare noises near a boundary between modes (error ~1 where most are ~1e-3): with 1024
calibration and 512 held-out samples, a handful of them made held-out / calibration ratios of 0.2-11 on the
same model. Each fit iteration draws SAMPLES_PER_ITERATION of the calibration samples.

Built-in pairs: every ComfyUI scheduler x every deterministic ODE sampler that runs on a bare denoiser
(BUILTIN_SAMPLERS), with the most steps whose counted calls fit the budget, (a) at the model's own shift
and (b) at each shift of HINDSIGHT_SHIFTS, keeping the best in hindsight (a search no user does).
Fitted variants (FITTED): each solver x fit kind at seed 0; the default variant also at seeds 1 and 2
(different calibration noise and split), so a seed that diverges or overfits shows in the table; it
settles SETTLE_ITERATIONS more iterations at the budgets named there (fit_sampler's settle_iterations).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time

import torch

NFE_BUDGETS = (4, 6, 8, 10, 16)
OWN_SHIFTS = (1.0, 3.0)
HINDSIGHT_SHIFTS = (1.0, 2.0, 3.0, 6.0)
# the sharp mixture's fits read 0.53x (worst 0.68x) on 4096 held-out noises and 0.46x (0.62x) on 32768: a set of
# 4096 holds too few or too many of the rare mode-switching noises that carry the mean
HELD_OUT_SAMPLES = 16384
# per budget: at 16 calls the fitted error is set by the rarest noises (near a boundary between modes), and a
# fit on 8192 of them learnt their few mode switches: fresh / calibration error up to 1.9 (1.06-1.41 with 32768);
# the settled 32-d fits at 10 calls read up to 1.72 with 8192 and 1.13 with 16384
CALIBRATION_SAMPLES = {4: 8192, 6: 8192, 8: 8192, 10: 16384, 16: 32768}
# per budget: the default variant's settling iterations (at 8 and 10 calls one plain fit in five landed over
# 0.5x the best pair, one in 48 settled)
SETTLE_ITERATIONS = {8: 400, 10: 400}
SAMPLES_PER_ITERATION = 1024
FRESH_SAMPLES = 16384
ITERATIONS = 300
WORKERS = max(1, min(4, os.cpu_count() or 1))
BUILTIN_SAMPLERS = (
    "euler", "heun", "heunpp2", "dpm_2", "lms", "dpmpp_2m", "ipndm", "ipndm_v", "deis",
    "res_multistep", "gradient_estimation", "uni_pc", "uni_pc_bh2",
)  # fmt: skip
DEFAULT = ("multistep3", "bespoke")
FITTED = (("multistep3", "steps"), ("multistep3", "bespoke"))
SEEDS = (0, 1, 2)


def _builtin_samplers() -> dict:
    import comfy.samplers

    def as_function(ksampler, dtype):
        # UniPC mixes its own float32 coefficients into the state: it runs in float32 (error ~1e-7).
        def sampler(model, x, sigmas, disable=True):
            x = ksampler.sampler_function(
                model,
                x.to(dtype or x.dtype),
                sigmas.to(dtype or sigmas.dtype),
                extra_args={},
                callback=None,
                disable=disable,
                **ksampler.extra_options,
            )
            return x.to(torch.float64)

        return sampler

    return {
        name: as_function(comfy.samplers.sampler_object(name), torch.float32 if "uni_pc" in name else None)
        for name in BUILTIN_SAMPLERS
    }


def _mean_relative(x, reference) -> float:
    from lumina_turbo.samplers.fitted_sampler import relative_error

    return float(relative_error(x.to(torch.float64), reference).mean())


def _builtin_errors(mixture, noise, reference, schedulers, samplers, shift, budgets=NFE_BUDGETS) -> dict:
    """(scheduler, sampler) -> NFE budget -> error, at one shift."""
    import comfy.samplers

    from lumina_turbo.benchmarks.bench_schedules import _flow_model_sampling, _largest_schedule
    from lumina_turbo.benchmarks.exact_flow import make_denoiser

    model_sampling = _flow_model_sampling(shift)
    denoiser = make_denoiser(mixture)
    errors = {}
    for scheduler in schedulers:

        def make(steps, scheduler=scheduler):
            return comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps).to(torch.float64)

        for name, sampler in samplers.items():
            for budget in budgets:
                steps, sigmas = _largest_schedule(sampler, make, budget)
                if steps is None:
                    continue
                start = model_sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(noise))
                try:
                    x = sampler(denoiser, start, sigmas)
                except Exception:  # a pair that cannot run this schedule simply has no entry
                    continue
                error = _mean_relative(x, reference)
                if math.isfinite(error):
                    errors.setdefault((scheduler, name), {})[budget] = error
    return errors


def _best(errors: dict, budget: int) -> tuple[str, float]:
    pairs = [(f"{s} + {n}", e[budget]) for (s, n), e in errors.items() if budget in e]
    return min(pairs, key=lambda pair: pair[1])


def _fit(
    mixture, calibration, held_out, reference, fresh, shift, budget, solver, fit, seed, settle_iterations=0
) -> dict:
    from lumina_turbo.benchmarks.exact_flow import make_denoiser
    from lumina_turbo.samplers.fitted_sampler import CALLS_PER_INTERVAL
    from lumina_turbo.samplers.fitting import fit_sampler
    from lumina_turbo.samplers.schedules import time_shift

    steps = budget // CALLS_PER_INTERVAL[solver]
    start = time_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
    denoiser = make_denoiser(mixture)

    def denoise(x, sigma):
        return denoiser(x, sigma)

    began = time.perf_counter()
    fitted = fit_sampler(
        denoise,
        calibration,
        steps,
        solver=solver,
        fit=fit,
        start_sigmas=start,
        seed=seed,
        iterations=ITERATIONS,
        samples_per_iteration=SAMPLES_PER_ITERATION,
        settle_iterations=settle_iterations,
    )
    seconds = time.perf_counter() - began
    calls = {"count": 0}

    def counted(x, sigma):
        calls["count"] += 1
        return denoise(x, sigma)

    with torch.no_grad():
        error = _mean_relative(fitted.sample(counted, held_out), reference)
        fresh_error = _mean_relative(fitted.sample(denoise, fresh["noise"]), fresh["reference"])
    report = fitted.report
    return {
        "held_out_error": error,
        "nfe": calls["count"],
        "calibration_error": report["calibration_error"],
        "validation_error": report["validation_error"],
        "start_validation_error": report["start_validation_error"],
        "held_out_over_calibration": error / report["calibration_error"],
        "fresh_error": fresh_error,
        "fresh_over_calibration": fresh_error / report["calibration_error"],
        "best_iteration": report["best_iteration"],
        "settle_iterations": settle_iterations,
        "settled_from_best": report["settled_from_best"],
        "euler_at_final": fitted.euler_at_final,
        "reference_sample_calls": report["reference_cost"]["samples"],
        "fit_sample_calls": report["fit_cost"]["samples"],
        "fit_seconds": seconds,
        "sigmas": fitted.sigmas.tolist(),
    }


_SHARED: dict = {}  # per worker: mixture name -> its held-out and fresh noise with their references


def _worker_setup(shared: dict | None = None) -> None:
    """Pool initializer: ComfyUI's CPU setup (a spawned worker starts bare), one thread, the shared noise."""
    from lumina_turbo.devtools.comfy_host import bootstrap

    bootstrap()
    torch.set_num_threads(1)
    _SHARED.update(shared or {})


def _mixture_baselines(job: tuple[str, tuple[int, ...]]) -> dict:
    """One mixture's noise sets (held-out with exact endpoints, fresh with the fit's kind of reference) and
    the built-in pairs' errors at every shift and budget of ``job`` (mixture name, budgets)."""
    import comfy.samplers

    from lumina_turbo.benchmarks.bench_schedules import MIXTURES
    from lumina_turbo.benchmarks.exact_flow import make_denoiser, make_mixture, reference_solution
    from lumina_turbo.patches.stock_lists import SCHEDULER_NAMES as OURS
    from lumina_turbo.samplers.fitting import reference_solution as fitted_reference

    mixture_name, budgets = job
    schedulers = [name for name in comfy.samplers.SCHEDULER_NAMES if name not in OURS]
    samplers = _builtin_samplers()
    mixture = make_mixture(**MIXTURES[mixture_name])
    held_out = torch.randn(
        HELD_OUT_SAMPLES, mixture.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    reference = reference_solution(mixture, held_out)
    fresh_noise = torch.randn(
        FRESH_SAMPLES, mixture.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    # scored against the fit's own kind of reference, as its calibration error is
    fresh = {"noise": fresh_noise, "reference": fitted_reference(make_denoiser(mixture), fresh_noise)}
    by_shift = {
        shift: _builtin_errors(mixture, held_out, reference, schedulers, samplers, shift, budgets)
        for shift in sorted(set(HINDSIGHT_SHIFTS) | set(OWN_SHIFTS))
    }
    return {"held_out": held_out, "reference": reference, "fresh": fresh, "by_shift": by_shift}


def _fit_task(task: tuple) -> tuple:
    """One fitted variant of one model at one budget, on the worker's shared noise sets."""
    from lumina_turbo.benchmarks.bench_schedules import MIXTURES
    from lumina_turbo.benchmarks.exact_flow import make_mixture

    mixture_name, own_shift, budget, solver, fit, seed, settle_iterations = task
    settle_iterations = _settle_iterations(settle_iterations, budget)
    mixture = make_mixture(**MIXTURES[mixture_name])
    calibration = torch.randn(
        CALIBRATION_SAMPLES[budget],
        mixture.dim,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(1000 + seed),
    )
    shared = _SHARED[mixture_name]
    result = _fit(
        mixture,
        calibration,
        shared["held_out"],
        shared["reference"],
        shared["fresh"],
        own_shift,
        budget,
        solver,
        fit,
        seed,
        settle_iterations,
    )
    assert result["nfe"] <= budget, (solver, fit, budget, result["nfe"])
    return task, result


def fitted_variants() -> list[tuple]:
    """(solver, fit, seed, settle_iterations) of the schedules benchmark's fitted variants, in its table's order;
    settle_iterations None: the default variant's, SETTLE_ITERATIONS by budget."""
    return [
        (solver, fit, seed, None if (solver, fit) == DEFAULT else 0)
        for solver, fit in FITTED
        for seed in (SEEDS if (solver, fit) == DEFAULT else SEEDS[:1])
    ]


def _settle_iterations(variant_settle: int | None, budget: int) -> int:
    return SETTLE_ITERATIONS.get(budget, 0) if variant_settle is None else variant_settle


def variant_label(solver: str, fit: str, seed: int, settle_iterations: int | None) -> str:
    settled = f"/settle {settle_iterations}" if settle_iterations else ""
    return f"{solver}/{fit}{settled}/seed {seed}"


def _fit_tasks(names, budgets, variants) -> list[tuple]:
    """Every (mixture, own shift, budget, *variant), the costliest first so the workers end together."""
    from lumina_turbo.benchmarks.bench_schedules import MIXTURES

    tasks = [
        (name, own_shift, budget, *variant)
        for name in names
        for own_shift in OWN_SHIFTS
        for budget in budgets
        for variant in variants
    ]

    def cost(task):
        iterations = ITERATIONS + _settle_iterations(task[6], task[2])
        return MIXTURES[task[0]]["dim"] * task[2] * CALIBRATION_SAMPLES[task[2]] * iterations

    return sorted(tasks, key=lambda task: -cost(task))


def _models(names, baselines: dict, fits: dict, budgets, variants) -> list[dict]:
    """Per model (mixture x own shift): per budget the best built-in pairs and every fitted variant's result."""
    models = []
    for name in names:
        by_shift = baselines[name]["by_shift"]
        for own_shift in OWN_SHIFTS:
            model = {"mixture": name, "own_shift": own_shift, "budgets": {}}
            for budget in budgets:
                own_pair, own_error = _best(by_shift[own_shift], budget)
                hindsight = min(
                    (
                        (f"{pair} @ shift {s:g}", e)
                        for s in HINDSIGHT_SHIFTS
                        for pair, e in [_best(by_shift[s], budget)]
                    ),
                    key=lambda pair: pair[1],
                )
                entry = {
                    "best_own_shift": {"pair": own_pair, "error": own_error},
                    "best_hindsight": {"pair": hindsight[0], "error": hindsight[1]},
                    "fitted": {},
                }
                for variant in variants:
                    result = fits[(name, own_shift, budget, *variant)]
                    result["over_own_shift"] = result["held_out_error"] / own_error
                    result["over_hindsight"] = result["held_out_error"] / hindsight[1]
                    entry["fitted"][variant_label(*variant)] = result
                model["budgets"][budget] = entry
            models.append(model)
    return models


def run(budgets: tuple[int, ...] = NFE_BUDGETS, variants: list[tuple] | None = None) -> dict:
    """Every model x budget: built-in errors (own shift, hindsight) and the fitted variants' errors
    (``variants``: (solver, fit, seed, settle_iterations); None: the schedules benchmark's).

    WORKERS spawned processes (one CPU thread each) compute each mixture's noise sets and built-in errors,
    then take the fits one at a time, so the largest mixture does not leave the other workers idle."""
    from lumina_turbo.benchmarks.bench_schedules import MIXTURES

    names = list(MIXTURES)
    variants = variants or fitted_variants()
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(WORKERS, len(names)), initializer=_worker_setup) as pool:
        # the largest mixture first: taken last, it kept one worker busy long after the other had ended
        largest_first = sorted(names, key=lambda name: -MIXTURES[name]["dim"])
        jobs = [(name, tuple(budgets)) for name in largest_first]
        baselines = dict(zip(largest_first, pool.map(_mixture_baselines, jobs, chunksize=1), strict=True))
    shared = {
        name: {key: value for key, value in b.items() if key != "by_shift"} for name, b in baselines.items()
    }
    with context.Pool(WORKERS, initializer=_worker_setup, initargs=(shared,)) as pool:
        fits = dict(pool.imap_unordered(_fit_task, _fit_tasks(names, budgets, variants)))
    models = _models(names, baselines, fits, budgets, variants)
    setup = {
        "held_out_samples": HELD_OUT_SAMPLES,
        "fresh_samples": FRESH_SAMPLES,
        "calibration_samples": CALIBRATION_SAMPLES,
        "iterations": ITERATIONS,
        "default_settle_iterations": SETTLE_ITERATIONS,
    }
    return {"setup": setup, "models": models, "summary": _summary(models), "table": _table(models)}


def _geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(max(v, 1e-300)) for v in values) / len(values))


def _budgets(models) -> list[int]:
    return list(models[0]["budgets"])


def _summary(models) -> dict:
    summary = {}
    budgets = _budgets(models)
    for variant in models[0]["budgets"][budgets[0]]["fitted"]:
        per_budget = {}
        for budget in budgets:
            fits = [m["budgets"][budget]["fitted"][variant] for m in models]
            per_budget[budget] = {
                "over_own_shift_geomean": _geomean(f["over_own_shift"] for f in fits),
                "over_own_shift_worst": max(f["over_own_shift"] for f in fits),
                "over_hindsight_geomean": _geomean(f["over_hindsight"] for f in fits),
                "over_hindsight_worst": max(f["over_hindsight"] for f in fits),
                "held_out_over_calibration_worst": max(f["held_out_over_calibration"] for f in fits),
                "fresh_over_calibration_worst": max(f["fresh_over_calibration"] for f in fits),
                "fit_sample_calls": max(f["fit_sample_calls"] + f["reference_sample_calls"] for f in fits),
                "fit_seconds_mean": sum(f["fit_seconds"] for f in fits) / len(fits),
                "euler_at_final_fits": sum(f["euler_at_final"] for f in fits),
                "settle_iterations": max(f["settle_iterations"] for f in fits),
                "settled_from_best_fits": sum(f["settled_from_best"] for f in fits),
            }
        summary[variant] = per_budget
    return summary


def _implicit_settling(summary, budgets) -> str:
    """The caption's note on settling that the variants' labels do not name (the default variant's by budget)."""
    settled = {
        budget: per_budget[budget]["settle_iterations"]
        for variant, per_budget in summary.items()
        if variant == variant_label(*DEFAULT, SEEDS[0], None)
        for budget in budgets
        if per_budget[budget]["settle_iterations"]
    }
    if not settled:
        return ""
    return (
        f" The {'/'.join(DEFAULT)} fits settle more iterations: "
        + ", ".join(f"{n} at NFE {b}" for b, n in settled.items())
        + "."
    )


def _table(models) -> str:
    summary = _summary(models)
    budgets = _budgets(models)
    lines = [
        f"Fitted samplers on exact flows ({len(models) // len(OWN_SHIFTS)} mixtures x own shift "
        f"{' and '.join(f'{s:g}' for s in OWN_SHIFTS)} = {len(models)} models), held-out noise, mean relative "
        "terminal error at equal model calls. Each cell: fitted error / best built-in pair's, geometric mean "
        f"over the models (worst model in brackets). Built-in = {len(BUILTIN_SAMPLERS)} "
        "deterministic samplers x every scheduler; own = at the model's shift; hindsight = best over "
        f"shifts {', '.join(f'{s:g}' for s in HINDSIGHT_SHIFTS)}. Targets: own <= 0.5 at NFE 4-10 and < 1 at "
        f"16; hindsight <= 1.{_implicit_settling(summary, budgets)}",
        "",
        "| fitted variant | vs | " + " | ".join(f"NFE {n}" for n in budgets) + " |",
        "|---|---|" + "---:|" * len(budgets),
    ]
    for variant, per_budget in summary.items():
        for key, label in (("over_own_shift", "own shift"), ("over_hindsight", "hindsight")):
            cells = [
                f"{per_budget[n][key + '_geomean']:.2f} ({per_budget[n][key + '_worst']:.2f})"
                for n in budgets
            ]
            lines.append(f"| {variant} | {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Generalisation and cost per fitted variant, worst model: error on "
        f"{FRESH_SAMPLES} fresh noises / calibration error (both against the fit's own 64-interval "
        f"reference); the same with the {HELD_OUT_SAMPLES} held-out noises above (exact reference); fit "
        "cost in sample evaluations (reference + fit forward passes; backward passes not counted)",
        "",
        "| fitted variant | " + " | ".join(f"NFE {n}" for n in budgets) + " | mean fit seconds |",
        "|---|" + "---:|" * (len(budgets) + 1),
    ]
    for variant, per_budget in summary.items():
        cells = [
            f"{per_budget[n]['fresh_over_calibration_worst']:.2f}; "
            f"{per_budget[n]['held_out_over_calibration_worst']:.2f}; {per_budget[n]['fit_sample_calls'] / 1e6:.1f} M"
            for n in budgets
        ]
        seconds = sum(per_budget[n]["fit_seconds_mean"] for n in budgets) / len(budgets)
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {seconds:.1f} |")
    lines += [
        "",
        "Final interval, as each fit chose it on validation: fits (of "
        f"{len(models)} per cell) whose last step to sigma 0 is Euler (x = D) rather than extrapolated",
        "",
        "| fitted variant | " + " | ".join(f"NFE {n}" for n in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for variant, per_budget in summary.items():
        lines.append(
            f"| {variant} | " + " | ".join(str(per_budget[n]["euler_at_final_fits"]) for n in budgets) + " |"
        )
    lines += [
        "",
        "Best built-in pair per model (own shift / hindsight) and error, NFE 8",
        "",
        "| mixture | own shift | best at own shift | error | best in hindsight | error |",
        "|---|---:|---|---:|---|---:|",
    ]
    for m in models:
        entry = m["budgets"][8] if 8 in m["budgets"] else m["budgets"][budgets[0]]
        own, hind = entry["best_own_shift"], entry["best_hindsight"]
        lines.append(
            f"| {m['mixture']} | {m['own_shift']:g} | {own['pair']} | {own['error']:.4f} "
            f"| {hind['pair']} | {hind['error']:.4f} |"
        )
    return "\n".join(lines)
