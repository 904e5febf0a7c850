"""`make bench BENCH=fit_settled`: the schedules benchmark's fits at 8 and 10 calls, plain and settled.

Time convention: ComfyUI sigma (1 = noise, 0 = data).

The schedules benchmark (benchmarks/fitted_exact_flow.py) settles its default fits at 8 and 10 calls; this is
the comparison behind that choice. The same models, noise sets, seeds and settings (its ``run`` at these
budgets) fit the default variant (bespoke multistep3, seeds 0-2) twice: plain, and with
``settle_iterations=SETTLE_ITERATIONS`` (the iterations of the plain fit, then that many at the final learning
rate). Both run side by side in one run.
"""

from __future__ import annotations

BUDGETS = (8, 10)
SETTLE_ITERATIONS = 400


def run() -> dict:
    from lumina_turbo.benchmarks import fitted_exact_flow as fitted

    default = [v for v in fitted.fitted_variants() if v[:2] == fitted.DEFAULT]
    variants = [(*v[:3], settle) for settle in (0, SETTLE_ITERATIONS) for v in default]
    result = fitted.run(BUDGETS, variants)
    result["table"] += "\n\n" + _per_fit_table(result["models"], default)
    return result


def _per_fit_table(models, default) -> str:
    from lumina_turbo.benchmarks.fitted_exact_flow import variant_label as label
    from lumina_turbo.samplers.fitting import SETTLE_FROM_BEST_ABOVE

    lines = [
        "Per model and budget: each seed's fitted error / the best built-in pair's at the model's shift, plain and "
        f"settled ({SETTLE_ITERATIONS} more iterations; * = the settling started from the best iterate, the last "
        f"one being over {SETTLE_FROM_BEST_ABOVE:g}x worse on validation)",
        "",
        "| mixture | own shift | NFE | plain, seeds "
        + ", ".join(str(v[2]) for v in default)
        + " | settled |",
        "|---|---:|---:|---|---|",
    ]
    for model in models:
        for budget, entry in model["budgets"].items():
            plain = [entry["fitted"][label(*v[:3], 0)] for v in default]
            settled = [entry["fitted"][label(*v[:3], SETTLE_ITERATIONS)] for v in default]
            lines.append(
                f"| {model['mixture']} | {model['own_shift']:g} | {budget} | "
                + ", ".join(f"{f['over_own_shift']:.2f}" for f in plain)
                + " | "
                + ", ".join(
                    f"{f['over_own_shift']:.2f}{'*' if f['settled_from_best'] else ''}" for f in settled
                )
                + " |"
            )
    return "\n".join(lines)
