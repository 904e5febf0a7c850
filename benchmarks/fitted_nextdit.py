"""LTFitSampler on a tiny random-weight NextDiT (Lumina-2 layout), through ComfyUI's real executor.

Part of ``python -m benchmarks schedules``. Time convention: ComfyUI sigma (1 = noise, 0 = data).
Prompts: LTModelLoader (tiny-random-lumina2) -> CLIPTextEncodeLumina2 -> CFGGuider (cfg 3); the
held-out noise is RandomNoise(seed 7) on a batch of HELD_OUT latents that the fit never sees (its
calibration noise comes from its own seed). Reference: LTFlowMidpointSampler on 64 intervals of the
model's ``simple`` schedule. Built-in pairs: every scheduler x sampler of fitted_exact_flow.BUILTIN_SAMPLERS
through SamplerCustomAdvanced, the most steps whose calls fit the budget (heun-like samplers: fewer
steps). Score: mean per-sample relative terminal error against the reference. Random weights make an
arbitrary, smooth flow: a check that the node path works and helps, not a picture-quality claim.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch

from lumina_turbo.devtools.prompts import encode, fit_sampler, tiny_loader

BUDGETS = (8,)
HELD_OUT = 8
CALIBRATION = 16
ITERATIONS = 100
CALLS_PER_STEP = {"heun": 2, "heunpp2": 3, "dpm_2": 2}  # the others: one call per step


def _base(g):
    loader = tiny_loader(g, "lumina2")
    pos, neg = encode(g, "lumina2", loader.out(1), "a red cat"), encode(g, "lumina2", loader.out(1), "blurry")
    guider = g.node("CFGGuider", model=loader.out(0), positive=pos.out(0), negative=neg.out(0), cfg=3.0)
    latent = g.node("EmptySD3LatentImage", width=64, height=64, batch_size=HELD_OUT)
    return loader, guider, latent


def _sample(host, sampler_node, sigmas_node=None, scheduler=None, steps=None):
    from lumina_turbo.devtools.harness import graph

    g = graph()
    loader, guider, latent = _base(g)
    sampler = sampler_node(g, guider, latent)
    if sigmas_node is not None:
        sigmas = sigmas_node(sampler)
    else:
        sigmas = g.node(
            "BasicScheduler", model=loader.out(0), scheduler=scheduler, steps=steps, denoise=1.0
        ).out(0)
    sampled = g.node(
        "SamplerCustomAdvanced",
        noise=g.node("RandomNoise", noise_seed=7).out(0),
        guider=guider.out(0),
        sampler=sampler.out(0),
        sigmas=sigmas,
        latent_image=latent.out(0),
    )
    g.node("SaveLatent", samples=sampled.out(0), filename_prefix="bench")
    return host.latent(host.run(g.finalize()))


def _error(x, reference) -> float:
    from lumina_turbo.samplers.fitted_sampler import relative_error

    return float(relative_error(x.to(torch.float64), reference.to(torch.float64)).mean())


def run() -> dict:
    import comfy.samplers

    from lumina_turbo.benchmarks.fitted_exact_flow import BUILTIN_SAMPLERS
    from lumina_turbo.devtools.harness import ComfyHost, install_tiny_models
    from lumina_turbo.patches.stock_lists import SCHEDULER_NAMES as OURS

    install_tiny_models()
    host = ComfyHost(Path(tempfile.mkdtemp(prefix="bench-fit-")))
    schedulers = [name for name in comfy.samplers.SCHEDULER_NAMES if name not in OURS]

    def midpoint(g, guider, latent):
        return g.node("LTFlowMidpointSampler", final_step="midpoint")

    reference = _sample(host, midpoint, scheduler="simple", steps=64)
    rows, fitted = [], {}
    for budget in BUDGETS:
        for name in BUILTIN_SAMPLERS:
            steps = budget // CALLS_PER_STEP.get(name, 1)
            for scheduler in schedulers:

                def select(g, guider, latent, name=name):
                    return g.node("KSamplerSelect", sampler_name=name)

                try:
                    x = _sample(host, select, scheduler=scheduler, steps=steps)
                except Exception:  # a pair that cannot run here has no entry
                    continue
                error = _error(x, reference)
                if math.isfinite(error):
                    rows.append({"nfe": budget, "pair": f"{scheduler} + {name}", "error": error})
        for solver, fit in (("multistep3", "steps"), ("multistep3", "bespoke")):

            def fit_node(g, guider, latent, solver=solver, fit=fit, budget=budget):
                return fit_sampler(
                    g, guider.out(0), latent.out(0), steps=budget, solver=solver, fit=fit,
                    calibration_samples=CALIBRATION, iterations=ITERATIONS, batch_size=CALIBRATION,
                )  # fmt: skip

            began = time.perf_counter()
            x = _sample(host, fit_node, sigmas_node=lambda node: node.out(1))
            seconds = time.perf_counter() - began
            fitted[(budget, f"{solver}/{fit}")] = {"error": _error(x, reference), "seconds": seconds}
    summary = []
    for budget in BUDGETS:
        best = min((r for r in rows if r["nfe"] == budget), key=lambda r: r["error"])
        for variant in ("multistep3/steps", "multistep3/bespoke"):
            result = fitted[(budget, variant)]
            summary.append(
                {
                    "nfe": budget,
                    "variant": variant,
                    "error": result["error"],
                    "best_pair": best["pair"],
                    "best_pair_error": best["error"],
                    "ratio": result["error"] / best["error"],
                    "fit_and_sample_seconds": result["seconds"],
                }
            )
    lines = [
        f"Tiny random NextDiT through the nodes (CFGGuider cfg 3, 64x64, {HELD_OUT} held-out latents; fit: "
        f"{CALIBRATION} calibration samples, {ITERATIONS} iterations). Mean relative terminal error vs 64 "
        "midpoint intervals. Target: bespoke <= 0.7x the best built-in pair at NFE 8.",
        "",
        "| NFE | fitted | error | best built-in pair | error | fitted / best | fit + sample seconds |",
        "|---:|---|---:|---|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['nfe']} | {s['variant']} | {s['error']:.4f} | {s['best_pair']} | {s['best_pair_error']:.4f} "
            f"| {s['ratio']:.2f} | {s['fit_and_sample_seconds']:.0f} |"
        )
    return {"summary": summary, "builtin": rows, "table": "\n".join(lines)}
