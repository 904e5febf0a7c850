"""LTCFGGuider against ComfyUI's RenormCFG and CFGGuider: wall time and transformer rows, side by side.

A Lumina-2-shaped NextDiT (ComfyUI's own classes, random weights) at a 64x64 latent = 1024 image tokens,
so the transformer dominates; 30 euler steps on the model's own schedule (shift 6), cfg 4, batch 1.
Four runs in two pairs; each repeat times both runs of a pair back to back (which one first alternates), and
the reported wall-time ratio is the median of those paired ratios (robust to load from other processes):

* ``renormcfg``: ComfyUI's RenormCFG node (its defaults: cfg_trunc 100, renorm_cfg 1.0) + CFGGuider;
* ``lt_trunc``: LTCFGGuider, renorm cap 1.0, step_fraction 0.25 (7 guided steps of 30);
* ``cfgguider``: ComfyUI's CFGGuider;
* ``lt_off``: LTCFGGuider, renorm cap 1.0, truncation off (our overhead over CFGGuider);
* ``control``: a second ComfyUI CFGGuider, timed against the first: how far a ratio of equal work strays.

Rows are counted by a DIFFUSION_MODEL wrapper (x.shape[0] per forward). Process CPU time is reported beside
wall time: with one thread it is the work done, and it barely moves when other processes load the machine.
Time convention: ComfyUI sigma.
Threads: 1 by default (LT_BENCH_THREADS overrides): on a shared 2-core machine a second OpenMP thread made
every forward several times slower and the timings erratic.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

STEPS = 30
CFG = 4.0
REPEATS = int(os.environ.get("LT_BENCH_REPEATS", "5"))
# (ours, theirs); the last pair times ComfyUI's CFGGuider against itself: the noise floor of the ratios
PAIRS = [("lt_trunc", "renormcfg"), ("lt_off", "cfgguider"), ("control", "cfgguider")]
THREADS = int(os.environ.get("LT_BENCH_THREADS", "1"))
LATENT = (1, 16, 64, 64)  # 32x32 patches of 2 = 1024 image tokens
CAPTION_TOKENS = 32
CONFIG = dict(  # diffusers Lumina2Transformer2DModel: Lumina-2 layout (GQA, 3-axis RoPE), narrow
    patch_size=2,
    in_channels=16,
    hidden_size=128,
    num_layers=2,
    num_refiner_layers=1,
    num_attention_heads=2,
    num_kv_heads=1,
    multiple_of=64,
    ffn_dim_multiplier=None,
    norm_eps=1e-5,
    axes_dim_rope=(16, 24, 24),
    axes_lens=(300, 512, 512),
    cap_feat_dim=64,
)


def _build():
    from diffusers import Lumina2Transformer2DModel

    from lumina_turbo.models import nextdit_build, tiny_transformers

    model = tiny_transformers.reinit_parameters(Lumina2Transformer2DModel(**CONFIG), seed=0).eval()
    return nextdit_build.build_nextdit_from_diffusers(model.state_dict(), dict(CONFIG))


class _Rows:
    def __init__(self):
        self.rows = 0

    def __call__(self, executor, x, *args, **kwargs):
        self.rows += x.shape[0]
        return executor(x, *args, **kwargs)


def _no_transformer(executor, x, *args, **kwargs):
    # DIFFUSION_MODEL wrapper that skips the transformer: what remains is the sampling and guidance overhead
    return torch.zeros_like(x)


def _guiders(patcher, positive, negative, wrapper_factory=_Rows):
    import comfy.patcher_extension
    import comfy.samplers
    from comfy_extras.nodes_lumina2 import RenormCFG

    from lumina_turbo.nodes.guidance import LTCFGGuider

    lt = dict(renorm=1.0, renorm_mode="cap", after_trunc="cond", cfg_formula="comfy")

    def stock(model):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(CFG)
        return guider

    def ours(model, trunc_mode):
        return LTCFGGuider.execute(
            model=model,
            positive=positive,
            negative=negative,
            cfg=CFG,
            trunc_mode=trunc_mode,
            trunc=0.25,
            **lt,
        ).result[0]

    makers = {
        "renormcfg": lambda m: stock(RenormCFG.execute(model=m, cfg_trunc=100.0, renorm_cfg=1.0).result[0]),
        "lt_trunc": lambda m: ours(m, "step_fraction"),
        "cfgguider": stock,
        "lt_off": lambda m: ours(m, "off"),
        "control": stock,
    }
    guiders = {}
    for name, make in makers.items():
        counter = wrapper_factory()
        model = patcher.clone()
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench_rows", counter)
        guiders[name] = (make(model), counter)
    return guiders


def _sample(guider, sigmas, noise):
    import comfy.samplers

    start, cpu_start = time.perf_counter(), time.process_time()
    guider.sample(
        noise.clone(),
        torch.zeros_like(noise),
        comfy.samplers.sampler_object("euler"),
        sigmas,
        seed=0,
        disable_pbar=True,
    )
    return time.perf_counter() - start, time.process_time() - cpu_start


def run() -> dict:
    from comfy_host import bootstrap

    bootstrap()
    import comfy.samplers

    torch.set_num_threads(THREADS)
    patcher = _build()
    generator = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, CAPTION_TOKENS, CONFIG["cap_feat_dim"], generator=generator), {}]]
    negative = [[torch.randn(1, CAPTION_TOKENS, CONFIG["cap_feat_dim"], generator=generator), {}]]
    noise = torch.randn(LATENT, generator=generator)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", STEPS)
    guiders = _guiders(patcher, positive, negative)
    names = list(guiders)

    _sample(guiders["lt_off"][0], sigmas[-3:], noise)  # warm-up: first-call allocations
    times = {name: [] for name in guiders}
    cpu_times = {name: [] for name in guiders}
    ratios = {pair: [] for pair in PAIRS}
    cpu_ratios = {pair: [] for pair in PAIRS}
    rows = {}
    for repeat in range(REPEATS):
        # each pair back to back, which one goes first alternating, so load from other processes hits both
        for ours, theirs in PAIRS[repeat % 2 :] + PAIRS[: repeat % 2]:
            wall, cpu = {}, {}
            for name in (ours, theirs) if repeat % 2 == 0 else (theirs, ours):
                guider, counter = guiders[name]
                before = counter.rows
                wall[name], cpu[name] = _sample(guider, sigmas, noise)
                times[name].append(wall[name])
                cpu_times[name].append(cpu[name])
                rows[name] = counter.rows - before
            ratios[(ours, theirs)].append(wall[ours] / wall[theirs])
            cpu_ratios[(ours, theirs)].append(cpu[ours] / cpu[theirs])

    # the same four runs with the transformer skipped: our overhead over CFGGuider in seconds per run
    bare = _guiders(patcher, positive, negative, wrapper_factory=lambda: _no_transformer)
    overhead = {
        name: min(_sample(guider, sigmas, noise)[1] for _ in range(5)) for name, (guider, _) in bare.items()
    }

    median = {name: statistics.median(values) for name, values in times.items()}
    cpu_median = {name: statistics.median(values) for name, values in cpu_times.items()}
    paired = {pair: statistics.median(values) for pair, values in ratios.items()}
    cpu_paired = {pair: statistics.median(values) for pair, values in cpu_ratios.items()}
    trunc, off, control = PAIRS
    result = {
        "model": {
            **{k: v for k, v in CONFIG.items() if not isinstance(v, tuple)},
            "image_tokens": (LATENT[2] // 2) * (LATENT[3] // 2),
            "caption_tokens": CAPTION_TOKENS,
        },
        "steps": STEPS,
        "cfg": CFG,
        "sampler": "euler",
        "repeats": REPEATS,
        "threads": THREADS,
        "seconds": {name: [round(t, 3) for t in values] for name, values in times.items()},
        "median_seconds": {name: round(t, 3) for name, t in median.items()},
        "rows": rows,
        "cpu_seconds": {name: [round(t, 3) for t in values] for name, values in cpu_times.items()},
        "paired_ratios": {f"{a}/{b}": [round(r, 3) for r in ratios[(a, b)]] for a, b in PAIRS},
        "paired_cpu_ratios": {f"{a}/{b}": [round(r, 3) for r in cpu_ratios[(a, b)]] for a, b in PAIRS},
        "cpu_ratio_trunc_vs_renormcfg": round(cpu_paired[trunc], 3),
        "cpu_ratio_off_vs_cfgguider": round(cpu_paired[off], 3),
        "control_ratio_cfgguider_vs_itself": round(paired[control], 3),
        "control_cpu_ratio_cfgguider_vs_itself": round(cpu_paired[control], 3),
        "ratio_trunc_vs_renormcfg": round(paired[trunc], 3),
        "nfe_ratio_trunc_vs_renormcfg": round(rows["lt_trunc"] / rows["renormcfg"], 3),
        "ratio_off_vs_cfgguider": round(paired[off], 3),
        "nfe_ratio_off_vs_cfgguider": round(rows["lt_off"] / rows["cfgguider"], 3),
        "ratio_of_medians": {f"{a}/{b}": round(median[a] / median[b], 3) for a, b in PAIRS},
        "cpu_seconds_without_transformer": {name: round(t, 4) for name, t in overhead.items()},
        "overhead_off_vs_cfgguider_fraction": round(
            (overhead["lt_off"] - overhead["cfgguider"]) / cpu_median["cfgguider"], 4
        ),
        "targets": {"ratio_trunc_vs_renormcfg": "<= 0.67", "ratio_off_vs_cfgguider": "<= 1.03"},
    }
    lines = [
        f"LTCFGGuider vs ComfyUI, 30 euler steps, cfg 4, 1024 image tokens, {THREADS} thread(s), "
        f"{REPEATS} interleaved repeats; wall-time ratio = median of the back-to-back pair ratios",
        "",
        "| run | median wall s | median CPU s | transformer rows |",
        "|---|---|---|---|",
        *[f"| {name} | {median[name]:.2f} | {cpu_median[name]:.2f} | {rows[name]} |" for name in names],
        "",
        "| ratio | wall time | CPU time | rows (NFE) | target |",
        "|---|---|---|---|---|",
        f"| LTCFGGuider step_fraction 0.25 / RenormCFG | {result['ratio_trunc_vs_renormcfg']} | "
        f"{result['cpu_ratio_trunc_vs_renormcfg']} | {result['nfe_ratio_trunc_vs_renormcfg']} | <= 0.67 |",
        f"| LTCFGGuider off / CFGGuider | {result['ratio_off_vs_cfgguider']} | "
        f"{result['cpu_ratio_off_vs_cfgguider']} | {result['nfe_ratio_off_vs_cfgguider']} | <= 1.03 |",
        f"| control: CFGGuider / CFGGuider (noise floor) | {result['control_ratio_cfgguider_vs_itself']} | "
        f"{result['control_cpu_ratio_cfgguider_vs_itself']} | 1.0 | 1 |",
        "",
        f"Transformer skipped, CPU s per 30-step run: LTCFGGuider off {overhead['lt_off']:.4f}, CFGGuider "
        f"{overhead['cfgguider']:.4f}: our guidance overhead is "
        f"{100 * result['overhead_off_vs_cfgguider_fraction']:.2f} % of a CFGGuider run.",
    ]
    result["table"] = "\n".join(lines)
    return result
