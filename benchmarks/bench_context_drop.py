"""LTContextDrop at Lumina-2's real width: forward time against the exact model, and final-latent PSNR.

Model: ComfyUI's own NextDiT with the released Lumina-Image-2.0 block (hidden 2304, 24 query / 8 kv
heads of 96 = 3 x 32 RoPE axes, FFN 9216, caption features 2304; random weights) but only
``LT_BENCH_LAYERS`` main layers (default 1) and no refiners, so that repeats fit on a CPU. What a forward
of the released model (26 main layers + 2 noise + 2 context refiners) costs is extrapolated from the
measured parts: ``rest + 2 * exact_layer + 26 * layer`` (rest = embedders, RoPE, final layer; measured).
A noise refiner is the same block over the image tokens only (32 fewer), so an exact main layer is an
upper bound of its cost; the context refiners see the 32 caption tokens only and are left out
(~0.1%). Layer times come from forward hooks on the bench's own model (instrumentation only).

Runs, each repeat in turn (order reversed every other repeat, so load from other processes hits
all), one model call at sigma 1 (every layer drops) on a latent of ``LT_BENCH_TOKENS`` image tokens
(default 4096 = 1024x1024; 16384 = 2048x2048 is the paper's setting, ~6x the time per repeat):

* ``exact``: the unpatched model; ``k2`` / ``k3``: LTContextDrop kernel 2 / 3 (defaults otherwise);
* each with ComfyUI's attention of this machine (CPU: sub-quadratic) and with PyTorch SDPA (ComfyUI's
  attention on GPUs; set through ``optimized_attention_override``, which the context drop chains to).

Ratios are medians over repeats of the back-to-back ratio to ``exact`` (spread: min-max), in process
CPU time with one thread (``LT_BENCH_THREADS``), where other processes on a shared machine barely
change it; wall time beside it. The sampling ratio of the released model is extrapolated over
Lumina-2's 30-step schedule (shift 6, 'simple') from the per-layer times and the layers the defaults
drop at each step (none below sigma 0.3). PSNR = 10 log10(range^2 / MSE) of the final latent of a
``STEPS``-step euler run (cfg 1) against the exact one, with the bench model (one dropping layer; with
random weights a measure of numerical deviation, not of picture quality). Time convention: ComfyUI
sigma (1 = noise).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from contextlib import contextmanager

import torch

STEPS = 3  # PSNR runs; sigma 1, 0.92, 0.75 at shift 6: the bench model's layer drops at each
REPEATS = int(os.environ.get("LT_BENCH_REPEATS", "5"))
THREADS = int(os.environ.get("LT_BENCH_THREADS", "1"))
LAYERS = int(os.environ.get("LT_BENCH_LAYERS", "1"))
TOKENS = tuple(int(t) for t in os.environ.get("LT_BENCH_TOKENS", "4096").split(","))
CAPTION_TOKENS = 32
RELEASED = {"main_layers": 26, "noise_refiner_layers": 2, "context_refiner_layers": 2}
SCHEDULE = {"steps": 30, "scheduler": "simple"}  # Lumina-2's defaults, on the model's shift 6
CONFIG = dict(  # diffusers Lumina2Transformer2DModel at the released width
    patch_size=2,
    in_channels=16,
    hidden_size=2304,
    num_layers=LAYERS,
    num_refiner_layers=0,
    num_attention_heads=24,
    num_kv_heads=8,
    multiple_of=256,
    ffn_dim_multiplier=None,
    norm_eps=1e-5,
    axes_dim_rope=(32, 32, 32),
    axes_lens=(300, 512, 512),
    cap_feat_dim=2304,
)
KERNELS = {"exact": 1, "k2": 2, "k3": 3}
RUNS = [("default", "exact"), ("default", "k2"), ("default", "k3"), ("sdpa", "exact"), ("sdpa", "k2")]


def _build():
    from diffusers import Lumina2Transformer2DModel

    from lumina_turbo.devtools import tiny_transformers
    from lumina_turbo.loading import nextdit_build

    model = tiny_transformers.reinit_parameters(Lumina2Transformer2DModel(**CONFIG), seed=0).eval()
    state_dict = model.state_dict()
    del model
    return nextdit_build.build_nextdit_from_diffusers(state_dict, dict(CONFIG), consume=True)


class LayerClock:
    """Process CPU and wall seconds spent inside the main layers during one forward."""

    def __init__(self, layers):
        self.cpu = self.wall = 0.0
        self._start = None
        self.handles = []
        for layer in layers:
            self.handles.append(layer.register_forward_pre_hook(self._enter))
            self.handles.append(layer.register_forward_hook(self._leave))

    def _enter(self, *_):
        self._start = (time.process_time(), time.perf_counter())

    def _leave(self, *_):
        cpu, wall = self._start
        self.cpu += time.process_time() - cpu
        self.wall += time.perf_counter() - wall

    def reset(self):
        self.cpu = self.wall = 0.0

    def remove(self):
        for handle in self.handles:
            handle.remove()


def sdpa_override(func, *args, **kwargs):
    """``optimized_attention_override``: ComfyUI's PyTorch SDPA attention instead of this machine's."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


def _options(patcher, backend):
    """transformer_options as ComfyUI's sampler builds them (model_options + the patcher's wrappers)."""
    import comfy.patcher_extension as pe

    options = pe.copy_nested_dicts(patcher.model_options["transformer_options"])
    pe.merge_nested_dicts(options.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    if backend == "sdpa":
        options["optimized_attention_override"] = sdpa_override
    return options


def _forward(patcher, backend, x, context, clock):
    """(forward CPU s, forward wall s, layers CPU s, layers wall s) of one model call at sigma 1."""
    options = _options(patcher, backend)
    clock.reset()
    cpu, wall = time.process_time(), time.perf_counter()
    patcher.model.apply_model(
        x, torch.ones(1), c_crossattn=context, num_tokens=context.shape[1], transformer_options=options
    )
    return time.process_time() - cpu, time.perf_counter() - wall, clock.cpu / LAYERS, clock.wall / LAYERS


def _sample(patcher, sigmas, noise, context):
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds([[context, {}]], [[context, {}]])
    guider.set_cfg(1.0)
    sampler = comfy.samplers.sampler_object("euler")
    return guider.sample(noise.clone(), torch.zeros_like(noise), sampler, sigmas, seed=0, disable_pbar=True)


def psnr(reference, other):
    mse = float(((reference - other) ** 2).mean())
    peak = float(reference.max() - reference.min())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


@contextmanager
def _threads(count):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _ratios(series, reference):
    """median, min, max of the per-repeat ratios series[i] / reference[i]."""
    ratios = [a / b for a, b in zip(series, reference, strict=True)]
    return {
        "median": round(statistics.median(ratios), 3),
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
    }


def released_forward(rest, exact_layer, layer):
    """Seconds of one forward of the released model from the measured parts (see the module docstring)."""
    return rest + RELEASED["noise_refiner_layers"] * exact_layer + RELEASED["main_layers"] * layer


def released_sampling_ratio(rest, exact_layer, layer, sigmas):
    """Sampling time of the released model with LTContextDrop defaults / exact, at the sampled ``sigmas``:
    at each one ``n`` main layers drop (cost ``layer``), the others and the refiners run exact."""
    from lumina_turbo.patches import context_drop

    settings = context_drop.ContextDropSettings()
    layers = list(range(RELEASED["main_layers"]))
    dropped = exact = 0.0
    for sigma in sigmas:
        n = len(
            context_drop.dropping_layers(context_drop.drop_strength(sigma, 1.0, settings.end_sigma), layers)
        )
        dropped += rest + (RELEASED["noise_refiner_layers"] + len(layers) - n) * exact_layer + n * layer
        exact += released_forward(rest, exact_layer, exact_layer)
    return round(dropped / exact, 3)


def _measure(models, tokens, generator, clock, sigmas):
    """Interleaved forwards at ``tokens`` image tokens; per-run medians, ratios and extrapolations."""
    side = 2 * round(math.sqrt(tokens))
    x = torch.randn(1, 16, side, side, generator=generator)
    context = torch.randn(1, CAPTION_TOKENS, CONFIG["cap_feat_dim"], generator=generator)
    fields = ("forward_cpu", "forward_wall", "layer_cpu", "layer_wall")
    times = {run: {f: [] for f in fields} for run in RUNS}
    for repeat in range(REPEATS):
        for run in RUNS if repeat % 2 == 0 else RUNS[::-1]:
            backend, variant = run
            for field, value in zip(
                fields, _forward(models[variant], backend, x, context, clock), strict=True
            ):
                times[run][field].append(value)
    rows = {}
    for backend in dict.fromkeys(b for b, _ in RUNS):
        exact = times[(backend, "exact")]
        rest = statistics.median(
            f - LAYERS * c for f, c in zip(exact["forward_cpu"], exact["layer_cpu"], strict=True)
        )
        exact_layer = statistics.median(exact["layer_cpu"])
        for b, variant in RUNS:
            if b != backend:
                continue
            series = times[(b, variant)]
            layer = statistics.median(series["layer_cpu"])
            rows[f"{backend}/{variant}"] = {
                **{f"{f}_s": round(statistics.median(series[f]), 3) for f in fields},
                "forward_cpu_ratio": _ratios(series["forward_cpu"], exact["forward_cpu"]),
                "forward_wall_ratio": _ratios(series["forward_wall"], exact["forward_wall"]),
                "layer_cpu_ratio": _ratios(series["layer_cpu"], exact["layer_cpu"]),
                "layer_wall_ratio": _ratios(series["layer_wall"], exact["layer_wall"]),
                "released_forward_s": round(released_forward(rest, exact_layer, layer), 1),
                "released_forward_ratio": round(
                    released_forward(rest, exact_layer, layer)
                    / released_forward(rest, exact_layer, exact_layer),
                    3,
                ),
                "released_sampling_ratio": released_sampling_ratio(rest, exact_layer, layer, sigmas),
            }
    seconds = {
        f"{b}/{v}": {f: [round(t, 3) for t in s] for f, s in series.items()}
        for (b, v), series in times.items()
    }
    return {"image_tokens": (side // 2) ** 2, "latent": list(x.shape), "rows": rows, "seconds": seconds}


def _psnr_rows(models, generator):
    """Final latents of STEPS euler steps (Lumina-2's shift 6) against exact, at 4096 image tokens."""
    import comfy.samplers

    noise = torch.randn(1, 16, 128, 128, generator=generator)
    context = torch.randn(1, CAPTION_TOKENS, CONFIG["cap_feat_dim"], generator=generator)
    sigmas = comfy.samplers.calculate_sigmas(
        models["exact"].get_model_object("model_sampling"), "simple", STEPS
    )
    latents = {name: _sample(model, sigmas, noise, context) for name, model in models.items()}
    return {
        name: round(psnr(latents["exact"], latents[name]), 2) for name in models if name != "exact"
    }, sigmas


def run() -> dict:
    from lumina_turbo.devtools.comfy_host import bootstrap

    bootstrap()
    import comfy.ldm.modules.attention
    import comfy.samplers

    from lumina_turbo.patches.context_drop import ContextDropSettings, apply_context_drop

    patcher = _build()
    models = {
        name: patcher if kernel == 1 else apply_context_drop(patcher, ContextDropSettings(kernel=kernel))
        for name, kernel in KERNELS.items()
    }
    sampling = patcher.get_model_object("model_sampling")  # Lumina-2: shift 6
    sigmas = comfy.samplers.calculate_sigmas(sampling, SCHEDULE["scheduler"], SCHEDULE["steps"])[:-1].tolist()
    generator = torch.Generator().manual_seed(0)
    clock = LayerClock(patcher.model.diffusion_model.layers)
    with torch.inference_mode():
        with _threads(THREADS):
            small = torch.randn(1, 16, 32, 32, generator=generator)
            context = torch.randn(1, CAPTION_TOKENS, CONFIG["cap_feat_dim"], generator=generator)
            for backend, variant in RUNS:  # warm-up: first-call allocations, weights paged in
                _forward(models[variant], backend, small, context, clock)
            measured = {str(tokens): _measure(models, tokens, generator, clock, sigmas) for tokens in TOKENS}
        psnr_db, psnr_sigmas = _psnr_rows(models, generator)  # untimed: every core
    clock.remove()

    head = measured[str(TOKENS[0])]["rows"]
    attention = comfy.ldm.modules.attention.optimized_attention.__name__
    result = {
        "model": {
            **{k: v for k, v in CONFIG.items() if not isinstance(v, tuple)},
            "head_dim": CONFIG["hidden_size"] // CONFIG["num_attention_heads"],
            "ffn_dim": patcher.model.diffusion_model.layers[0].feed_forward.w1.weight.shape[0],
            "caption_tokens": CAPTION_TOKENS,
            "extrapolated_to": RELEASED,
        },
        "repeats": REPEATS,
        "threads": THREADS,
        "attention": {"default": attention, "sdpa": "attention_pytorch"},
        "tokens": measured,
        "psnr_db": psnr_db,
        "psnr_run": {
            "steps": STEPS,
            "sampler": "euler",
            "cfg": 1.0,
            "sigmas": [round(s, 4) for s in psnr_sigmas.tolist()],
        },
        "sampling_schedule": {
            **SCHEDULE,
            "shift": float(sampling.shift),
            "sigmas": [round(s, 4) for s in sigmas],
        },
        "forward_ratio_k2": head["default/k2"]["released_forward_ratio"],
        "forward_ratio_k2_sdpa": head["sdpa/k2"]["released_forward_ratio"],
        "layer_ratio_k2": head["default/k2"]["layer_cpu_ratio"]["median"],
        "sampling_ratio_k2": head["default/k2"]["released_sampling_ratio"],
        "psnr_k2_db": psnr_db["k2"],
        "targets": {"forward_ratio_k2": "<= 0.6"},
    }
    result["target_met"] = result["forward_ratio_k2"] <= 0.6
    lines = [
        f"LTContextDrop, Lumina-2 width (2304, 24/8 heads), {LAYERS} main layer(s) measured, {THREADS} thread(s), "
        f"{REPEATS} interleaved repeats; ratio = median (min-max) of per-repeat CPU-time ratios to exact; "
        "'released' = extrapolated to 26 main layers + 2 noise refiners",
        "",
        "| tokens | attention | run | layer s | layer ratio | bench forward ratio | released forward ratio "
        "| released 30-step sampling ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tokens, entry in measured.items():
        for name, r in entry["rows"].items():
            backend, variant = name.split("/")
            label = attention if backend == "default" else "attention_pytorch (SDPA)"
            lr, fr = r["layer_cpu_ratio"], r["forward_cpu_ratio"]
            lines.append(
                f"| {tokens} | {label} | {variant} | {r['layer_cpu_s']:.2f} | {lr['median']:.3f} "
                f"({lr['min']:.3f}-{lr['max']:.3f}) | {fr['median']:.3f} | {r['released_forward_ratio']:.3f} | "
                f"{r['released_sampling_ratio']:.3f} |"
            )
    lines += [
        "",
        f"Final latent after {STEPS} euler steps vs exact: "
        + ", ".join(f"{name} {db} dB PSNR" for name, db in psnr_db.items())
        + " (random weights: numerical deviation, not picture quality).",
        f"Target: released forward ratio of k2 <= 0.6 at {TOKENS[0]} tokens: "
        + ("met." if result["target_met"] else f"missed ({result['forward_ratio_k2']})."),
    ]
    result["table"] = "\n".join(lines)
    return result
