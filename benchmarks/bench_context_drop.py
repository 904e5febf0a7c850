"""LTContextDrop: forward and sampling time against the exact model, and the PSNR of the final latents.

A Lumina-2-shaped NextDiT (ComfyUI's own classes, random weights; grouped-query attention, head 96 =
3 x 32 RoPE axes, 6 layers + 1 refiner each) at a 128x128 latent = 4096 image tokens, 32 caption
tokens. Runs, each repeat in turn (order alternating so load from other processes hits all):

* ``exact``: the unpatched model;
* ``k2``: LTContextDrop defaults (kernel 2, full strength at sigma 1, none at sigma 0, linear);
* ``k2_const``: kernel 2 in every layer at every step (start_sigma 0.01);
* ``k3``: kernel 3, default schedule.

Forward time is one model call at sigma 1 (every selected layer drops); sampling is 6 euler steps on
the model's own schedule (shift 6), cfg 1, through ComfyUI's CFGGuider. Each run is timed in wall
time and in process CPU time; with one thread the CPU time barely depends on what other processes do
on a shared machine, so its ratio is the headline; the wall-time ratio stands beside it. A ratio is the
median over repeats of the back-to-back ratio to ``exact``. PSNR = 10 log10(range^2 / MSE) of the final
latent against the exact one (range = max - min of the exact latent). With random weights the PSNR is
a measure of numerical deviation, not of picture quality. Time convention: ComfyUI sigma.
Threads: 1 by default (LT_BENCH_THREADS), as in bench_guidance.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch

STEPS = 6
REPEATS = int(os.environ.get("LT_BENCH_REPEATS", "2"))
THREADS = int(os.environ.get("LT_BENCH_THREADS", "1"))
LATENT = (1, 16, 128, 128)  # 64 x 64 patches of 2 = 4096 image tokens
CAPTION_TOKENS = 32
CONFIG = dict(  # diffusers Lumina2Transformer2DModel: the Lumina-2 layout, narrow
    patch_size=2,
    in_channels=16,
    hidden_size=192,
    num_layers=6,
    num_refiner_layers=1,
    num_attention_heads=2,
    num_kv_heads=1,
    multiple_of=64,
    ffn_dim_multiplier=None,
    norm_eps=1e-5,
    axes_dim_rope=(32, 32, 32),
    axes_lens=(300, 512, 512),
    cap_feat_dim=64,
)
VARIANTS = {  # name -> ContextDropSettings kwargs (None = exact)
    "exact": None,
    "k2": dict(kernel=2),
    "k2_const": dict(kernel=2, start_sigma=0.01),
    "k3": dict(kernel=3),
}


def _build():
    from diffusers import Lumina2Transformer2DModel

    from lumina_turbo.models import nextdit_build, tiny_transformers

    model = tiny_transformers.reinit_parameters(Lumina2Transformer2DModel(**CONFIG), seed=0).eval()
    return nextdit_build.build_nextdit_from_diffusers(model.state_dict(), dict(CONFIG))


def _timed(fn):
    """(wall seconds, process CPU seconds, result) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def _forward(patcher, x, context):
    """One model call at sigma 1 with transformer_options as ComfyUI's sampler builds them."""
    import comfy.patcher_extension as pe

    options = pe.copy_nested_dicts(patcher.model_options["transformer_options"])
    pe.merge_nested_dicts(options.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    return _timed(
        lambda: patcher.model.apply_model(
            x, torch.ones(1), c_crossattn=context, num_tokens=context.shape[1], transformer_options=options
        )
    )


def _sample(guider, sigmas, noise):
    import comfy.samplers

    sampler = comfy.samplers.sampler_object("euler")
    return _timed(
        lambda: guider.sample(
            noise.clone(), torch.zeros_like(noise), sampler, sigmas, seed=0, disable_pbar=True
        )
    )


def psnr(reference, other):
    mse = float(((reference - other) ** 2).mean())
    peak = float(reference.max() - reference.min())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def run() -> dict:
    from comfy_host import bootstrap

    bootstrap()
    import comfy.ldm.modules.attention
    import comfy.samplers

    from lumina_turbo.models.context_drop import ContextDropSettings, apply_context_drop

    torch.set_num_threads(THREADS)
    patcher = _build()
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(1, CAPTION_TOKENS, CONFIG["cap_feat_dim"], generator=generator)
    noise = torch.randn(LATENT, generator=generator)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", STEPS)
    models = {
        name: patcher if kw is None else apply_context_drop(patcher, ContextDropSettings(**kw))
        for name, kw in VARIANTS.items()
    }
    guiders = {}
    for name, model in models.items():
        guiders[name] = comfy.samplers.CFGGuider(model)
        guiders[name].set_conds([[context, {}]], [[context, {}]])
        guiders[name].set_cfg(1.0)

    _sample(guiders["exact"], sigmas[-2:], noise)  # warm-up: first-call allocations
    names = list(VARIANTS)
    times = {
        kind: {n: [] for n in names}
        for kind in ("forward_wall", "forward_cpu", "sampling_wall", "sampling_cpu")
    }
    latents = {}
    for repeat in range(REPEATS):
        order = names if repeat % 2 == 0 else names[::-1]
        for name in order:
            wall, cpu, _ = _forward(models[name], noise, context)
            times["forward_wall"][name].append(wall)
            times["forward_cpu"][name].append(cpu)
        for name in order:
            wall, cpu, latents[name] = _sample(guiders[name], sigmas, noise)
            times["sampling_wall"][name].append(wall)
            times["sampling_cpu"][name].append(cpu)

    def ratio(kind, name):
        series = times[kind]
        return round(statistics.median(t / e for t, e in zip(series[name], series["exact"], strict=True)), 3)

    rows = {}
    for name in names:
        rows[name] = {
            **{f"{kind}_s": round(statistics.median(times[kind][name]), 3) for kind in times},
            **{f"{kind}_ratio": ratio(kind, name) for kind in times},
            "psnr_db": round(psnr(latents["exact"], latents[name]), 2) if name != "exact" else None,
        }
    result = {
        "model": {
            **{k: v for k, v in CONFIG.items() if not isinstance(v, tuple)},
            "image_tokens": (LATENT[2] // 2) * (LATENT[3] // 2),
            "caption_tokens": CAPTION_TOKENS,
        },
        "steps": STEPS,
        "sampler": "euler",
        "cfg": 1.0,
        "repeats": REPEATS,
        "threads": THREADS,
        "attention": comfy.ldm.modules.attention.optimized_attention.__name__,
        "seconds": {
            kind: {n: [round(t, 3) for t in v] for n, v in series.items()} for kind, series in times.items()
        },
        "results": rows,
        "forward_ratio_k2": rows["k2"]["forward_cpu_ratio"],
        "forward_wall_ratio_k2": rows["k2"]["forward_wall_ratio"],
        "sampling_ratio_k2": rows["k2"]["sampling_cpu_ratio"],
        "sampling_wall_ratio_k2": rows["k2"]["sampling_wall_ratio"],
        "psnr_k2_db": rows["k2"]["psnr_db"],
        "targets": {"forward_ratio_k2": "<= 0.6"},
    }
    lines = [
        f"LTContextDrop on a Lumina-2-shaped NextDiT, 4096 image tokens, {THREADS} thread(s), "
        f"{REPEATS} interleaved repeats ({result['attention']}); ratio = median of per-repeat ratios to exact, "
        "CPU time (wall time)",
        "",
        "| run | forward s, sigma 1 | forward ratio | sampling s, 6 steps | sampling ratio | PSNR vs exact (dB) |",
        "|---|---|---|---|---|---|",
        *[
            f"| {n} | {r['forward_cpu_s']:.2f} | {r['forward_cpu_ratio']:.3f} ({r['forward_wall_ratio']:.3f}) | "
            f"{r['sampling_cpu_s']:.2f} | {r['sampling_cpu_ratio']:.3f} ({r['sampling_wall_ratio']:.3f}) | "
            f"{'-' if r['psnr_db'] is None else r['psnr_db']} |"
            for n, r in rows.items()
        ],
        "",
        "Target: forward ratio of k2 <= 0.6. PSNR measures deviation from the exact model (random weights).",
    ]
    result["table"] = "\n".join(lines)
    return result
