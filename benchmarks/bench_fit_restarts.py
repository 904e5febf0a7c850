"""`make bench BENCH=fit_restarts`: does fitting a sampler several times and keeping the best, or settling it
longer, pay?

Time convention: ComfyUI sigma (1 = noise, 0 = data).

On flows with sharp modes one bespoke fit (samplers/fitting.py) can settle far from another: the same model,
budget and calibration noise gave 0.34x to 0.67x the best built-in pair depending only on the fit's seed
(its validation split and gradient draws). ``fit_sampler(restarts=k)`` runs k fits (seeds s, s + 1, ...)
and keeps the one with the lowest error on all of the calibration noise, at k times the cost.
``fit_sampler(settle_iterations=n)`` instead goes on for n iterations at the final learning rate, at about
(1.25 iterations + n) / (1.25 iterations) times the cost (the two schedule-only probes count).

Here, per model (mixture x own shift), budget and seed s, three single fits with seeds s, s + 1, s + 2 run
on the same calibration noise; restarts = k keeps, of the first k, the one fit_sampler(restarts=k) keeps
(lowest error on all the calibration noise; tests/samplers check that rule on the function itself), and one
fit with seed s per ``SETTLE_ITERATIONS`` (its first iterations are the seed-s single fit's). Each
fit is scored on BIG_HELD_OUT noises the fit never saw, against a 256-interval midpoint solution (its own
error ~1e-6, far below the fits'): with 4096 held-out noises the mean, set in part by rare noises near a
boundary between modes, moved by ~15 % between noise sets. The best built-in pair is found the same way as
in the schedules bench (every scheduler x deterministic sampler at the model's shift, on 4096 noises) and
its four best pairs are scored again on the big set, the best of them kept.
"""

from __future__ import annotations

import multiprocessing
import time

import torch

MIXTURE_NAMES = ("8-d, sharp (std .01-.05)", "8-d, 6 components")  # the hard one and a control
OWN_SHIFTS = (1.0, 3.0)
BUDGETS = (8, 10)
SEEDS = (0, 1, 2)
RESTARTS = (1, 2, 3)
SETTLE_ITERATIONS = (200, 400)  # about 1.5x and 2x one fit (its probes included): against 2 and 3 restarts
RANKING_SAMPLES = 4096
BIG_HELD_OUT = 32768
CALIBRATION_SAMPLES = 8192
SAMPLES_PER_ITERATION = 1024
SOLVER = "multistep3"
TOP_PAIRS = 4


def _best_builtin(mixture, ranking, big, shift) -> dict:
    """Best built-in pair per budget at ``shift``: ranked on ``ranking``, the top ones re-scored on ``big``."""
    import comfy.samplers

    from lumina_turbo.benchmarks.fitted_exact_flow import _builtin_errors, _builtin_samplers
    from lumina_turbo.patches.stock_lists import SCHEDULER_NAMES as OURS

    samplers = _builtin_samplers()
    schedulers = [name for name in comfy.samplers.SCHEDULER_NAMES if name not in OURS]
    ranked = _builtin_errors(mixture, ranking["noise"], ranking["reference"], schedulers, samplers, shift)
    best = {}
    for budget in BUDGETS:
        top = sorted((errors[budget], pair) for pair, errors in ranked.items() if budget in errors)[
            :TOP_PAIRS
        ]
        rescored = []
        for _, (scheduler, sampler) in top:
            errors = _builtin_errors(
                mixture, big["noise"], big["reference"], [scheduler], {sampler: samplers[sampler]}, shift
            )
            rescored.append((errors[(scheduler, sampler)][budget], f"{scheduler} + {sampler}"))
        error, pair = min(rescored)
        best[budget] = {"pair": pair, "error": error}
    return best


def _mixture(name: str) -> list[dict]:
    from lumina_turbo.devtools.comfy_host import bootstrap

    bootstrap()  # a spawned worker starts bare
    torch.set_num_threads(1)
    from lumina_turbo.benchmarks.bench_schedules import MIXTURES
    from lumina_turbo.benchmarks.exact_flow import make_denoiser, make_mixture
    from lumina_turbo.samplers.fitting import reference_solution
    from lumina_turbo.samplers.schedules import time_shift

    mixture = make_mixture(**MIXTURES[name])
    denoise = make_denoiser(mixture)

    def noise_set(count, seed):
        noise = torch.randn(
            count, mixture.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
        )
        return {"noise": noise, "reference": reference_solution(denoise, noise, steps=256)}

    ranking, big = noise_set(RANKING_SAMPLES, 0), noise_set(BIG_HELD_OUT, 7)
    rows = []
    for shift in OWN_SHIFTS:
        best = _best_builtin(mixture, ranking, big, shift)
        for budget in BUDGETS:
            start = time_shift(torch.linspace(1.0, 0.0, budget + 1, dtype=torch.float64), shift)
            for seed in SEEDS:
                calibration = torch.randn(
                    CALIBRATION_SAMPLES,
                    mixture.dim,
                    dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1000 + seed),
                )
                reference = reference_solution(denoise, calibration)
                task = (denoise, calibration, reference, budget, start, big, best[budget]["error"])
                fits = [_scored_fit(*task, seed + restart) for restart in range(max(RESTARTS))]
                settled = [_scored_fit(*task, seed, settle) for settle in SETTLE_ITERATIONS]
                kept = {
                    f"restarts {k}": min(fits[:k], key=lambda f: f["calibration_noise_error"])[
                        "over_best_builtin"
                    ]
                    for k in RESTARTS
                }
                kept.update({f"settle {f['settle_iterations']}": f["over_best_builtin"] for f in settled})
                rows.append(
                    {
                        "mixture": name,
                        "own_shift": shift,
                        "budget": budget,
                        "seed": seed,
                        "best_builtin": best[budget],
                        "fits": fits + settled,
                        "kept_over_best_builtin": kept,
                    }
                )
    return rows


def _scored_fit(
    denoise, calibration, reference, budget, start, big, best_error, seed, settle_iterations=0
) -> dict:
    """One fit, its error on the big held-out set over the best built-in pair's, and its cost."""
    from lumina_turbo.samplers.fitted_sampler import relative_error
    from lumina_turbo.samplers.fitting import fit_sampler

    began = time.perf_counter()
    fitted = fit_sampler(
        denoise,
        calibration,
        budget,
        solver=SOLVER,
        reference=reference,
        start_sigmas=start,
        seed=seed,
        samples_per_iteration=SAMPLES_PER_ITERATION,
        settle_iterations=settle_iterations,
    )
    report = fitted.report
    with torch.no_grad():
        held_out = float(relative_error(fitted.sample(denoise, big["noise"]), big["reference"]).mean())
    return {
        "seed": seed,
        "settle_iterations": settle_iterations,
        "calibration_noise_error": report["noise_error"],
        "held_out_error": held_out,
        "over_best_builtin": held_out / best_error,
        "fit_sample_calls": report["fit_cost"]["samples"],
        "fit_seconds": time.perf_counter() - began,
    }


def run() -> dict:
    from lumina_turbo.benchmarks.fitted_exact_flow import _geomean

    with multiprocessing.get_context("spawn").Pool(len(MIXTURE_NAMES)) as pool:
        rows = [row for part in pool.map(_mixture, MIXTURE_NAMES, chunksize=1) for row in part]
    summary = {}
    for name in MIXTURE_NAMES:
        mine = [r for r in rows if r["mixture"] == name]
        summary[name] = {
            variant: {
                "geomean": _geomean(r["kept_over_best_builtin"][variant] for r in mine),
                "worst": max(r["kept_over_best_builtin"][variant] for r in mine),
                "best": min(r["kept_over_best_builtin"][variant] for r in mine),
                "over_half": sum(r["kept_over_best_builtin"][variant] > 0.5 for r in mine),
                "fits": len(mine),
                "relative_cost": _relative_cost(mine, variant),
            }
            for variant in mine[0]["kept_over_best_builtin"]
        }
    lines = [
        f"Bespoke {SOLVER} fits kept from `restarts` whole fits, or settled `settle` more iterations, on exact flows: "
        f"{len(OWN_SHIFTS)} own shifts x NFE {', '.join(map(str, BUDGETS))} x {len(SEEDS)} seeds per "
        f"mixture; error on {BIG_HELD_OUT} held-out noises / the best built-in pair's on the same noises. "
        "Geometric mean, best, worst, fits over 0.5 (the target at NFE <= 10), and the model evaluations of the "
        "fits against one plain fit's.",
        "",
        "| mixture | fit | cost | geomean | best | worst | fits > 0.5 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, per_variant in summary.items():
        for variant, s in per_variant.items():
            lines.append(
                f"| {name} | {variant} | {s['relative_cost']:.2f}x | {s['geomean']:.3f} | {s['best']:.3f} "
                f"| {s['worst']:.3f} | {s['over_half']} of {s['fits']} |"
            )
    return {"rows": rows, "summary": summary, "table": "\n".join(lines)}


def _relative_cost(rows, variant: str) -> float:
    """Model evaluations of a variant's fits over those of the plain (seed s) fit, summed over ``rows``."""
    plain = sum(r["fits"][0]["fit_sample_calls"] for r in rows)
    kind, count = variant.split()
    if kind == "restarts":
        spent = sum(f["fit_sample_calls"] for r in rows for f in r["fits"][: int(count)])
    else:
        spent = sum(
            f["fit_sample_calls"] for r in rows for f in r["fits"] if f["settle_iterations"] == int(count)
        )
    return spent / plain
