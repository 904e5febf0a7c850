"""Peak memory with fp32 / bf16 / fp8 weights (load, one sampling step, one training step), LTModelLoader
vs ComfyUI's UNETLoader with the same weight_dtype; and LoRA quality on an fp8 base vs a bf16 base.

Memory: one random-weight Lumina-Image-2.0-shaped transformer at the released width (dim 2304, 24/8
heads, FFN 9216), so ComfyUI's UNETLoader detects it, with N_LAYERS = 16 main layers and 2+2 refiner
blocks (20 blocks of 87 M parameters: 1.74 B, 3.5 GB in bf16, 6.9 GB in fp32; the released models
have 30-34 blocks), so that weights dominate. UNETLoader's "default" load peaks at ~1.5x the fp32
size (~10.5 GB), the largest figure of the run. It is written as a bf16 file and a scaled-fp8 file
(ComfyUI's conventions, quantized from the bf16 values) of the same weights; fp32 is LTModelLoader's
fp32 choice on the bf16 file and UNETLoader's "default" (which holds fp32 on a CPU whatever the file
holds). Each configuration runs in a fresh process: after the imports and the synthetic training
data, the peak counters are reset before each phase (VmHWM through /proc/self/clear_refs; on a GPU
also torch.cuda's peak allocation), and each figure is the phase's peak above the resident size after
the imports, so the sampling and training figures include the resident weights.
The child processes run with MALLOC_MMAP_THRESHOLD_=1048576 (CHILD_ENV): glibc then maps every block
of 1 MiB or more on its own and returns it to the OS when freed, so the CPU peak RSS measures the
memory the process really uses, as torch.cuda's peak allocation does on a GPU. With glibc's defaults
its threshold rises to 32 MiB as large blocks are freed, and the per-layer fp32 cast copies of a CPU
run (21-81 MiB at width 2304) then stay on the heap after free: the RSS grows with freed memory that
a GPU's caching allocator would reuse and torch.cuda would not count.
Phases: load (the loader call); one sampling step (comfy.sample.sample, euler, 1 step, 32x32
latent, 32 caption tokens, under inference_mode as in the executor); one training step (the
LTLoraTrainer engine, rank 8, gradient checkpointing, batch 1 of the same size).

Quality: the tiny Lumina-2 model; LoRA runs of QUALITY_STEPS steps on bases loaded as bf16 / fp8 from
the same file (same seed, same data: 4 concept images), each LoRA then evaluated on the bf16 model
on 3 held-out images of the concept (anchor velocity loss at the 8 anchors, fixed noise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FP8_RATIO_LIMIT = 0.55  # fp8 / bf16 peak, every phase
VS_COMFY_MARGIN = 1.02  # ours <= UNETLoader's fp8 figure (+2 % for measurement noise)
HELD_OUT_LIMIT = 0.05
QUALITY_STEPS = 40
PHASES = ("load", "sampling", "training")
N_LAYERS = 16  # main layers, plus 2 + 2 refiner blocks
MMAP_THRESHOLD = 1 << 20  # glibc: blocks of 1 MiB or more are mapped on their own, returned when freed
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
LUMINA2_RELEASED_WIDTH = {
    "hidden_size": 2304, "num_layers": N_LAYERS, "num_refiner_layers": 2, "num_attention_heads": 24, "num_kv_heads": 8,
    "multiple_of": 256, "ffn_dim_multiplier": None, "axes_dim_rope": [32, 32, 32], "axes_lens": [300, 512, 512],
    "cap_feat_dim": 2304,
}  # fmt: skip
# (loader, label, file, weight_dtype): each row of the table; UNETLoader has no fp32/bf16 choice, so it
# gets "default" on the file that holds them (it picks the dtype itself: fp32 on a CPU).
RUNS = [
    ("lt", "fp32", "bf16", "fp32"),
    ("lt", "bf16", "bf16", "default"),
    ("lt", "fp8_e4m3fn", "bf16", "fp8_e4m3fn"),
    ("lt", "fp8_e5m2", "bf16", "fp8_e5m2"),
    ("lt", "scaled fp8 file", "scaled", "default"),
    ("comfy", "default", "bf16", "default"),
    ("comfy", "fp8_e4m3fn", "bf16", "fp8_e4m3fn"),
    ("comfy", "fp8_e5m2", "bf16", "fp8_e5m2"),
    ("comfy", "scaled fp8 file", "scaled", "default"),
]
FILES = {"bf16": "lumina2-w2304-bf16.safetensors", "scaled": "lumina2-w2304-scaled-fp8.safetensors"}


def write_models(folder: Path) -> dict[str, Path]:
    import safetensors.torch
    import torch
    from diffusers import Lumina2Transformer2DModel

    from lumina_turbo.devtools.comfy_host import bootstrap
    from lumina_turbo.devtools.scaled_fp8 import write_scaled_fp8
    from lumina_turbo.loading.nextdit_keys import diffusers_to_comfy

    bootstrap()  # the scaled-fp8 writer reads the layer list from ComfyUI's NextDiT

    with torch.device("meta"):
        model = Lumina2Transformer2DModel(**LUMINA2_RELEASED_WIDTH)
    shapes = {k: tuple(v.shape) for k, v in diffusers_to_comfy(model.state_dict()).items()}
    gen = torch.Generator().manual_seed(7)
    tensors = {k: (torch.randn(s, generator=gen) * 0.02).bfloat16() for k, s in shapes.items()}
    paths = {name: folder / file for name, file in FILES.items()}
    safetensors.torch.save_file(tensors, str(paths["bf16"]))
    del tensors
    write_scaled_fp8(paths["bf16"], paths["scaled"])
    return paths


def _spawn(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False, env=CHILD_ENV
    )
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="lt-bench-memory-") as work:
        work = Path(work)
        paths = write_models(work)
        runs = []
        for loader, label, file, weight_dtype in RUNS:
            result = _spawn("--child", loader, weight_dtype, str(paths[file]), str(work))
            runs.append({"loader": loader, "label": label, "file": FILES[file], "weight_dtype": weight_dtype,
                         **result})  # fmt: skip
        quality = _spawn("--quality", str(work))
    return summarize(runs, quality)


def summarize(runs: list[dict], quality: dict) -> dict:
    def row(loader, label):
        return next(r for r in runs if r["loader"] == loader and r["label"] == label)

    gpu = runs[0]["vram"] is not None
    unit = "vram" if gpu else "rss"
    ratios, checks = {}, {}
    for label in ("fp8_e4m3fn", "fp8_e5m2", "scaled fp8 file"):
        ours, bf16 = row("lt", label), row("lt", "bf16")
        ratios[label] = {p: ours[unit][p] / bf16[unit][p] for p in PHASES}
        checks[f"{label} <= {FP8_RATIO_LIMIT} x bf16"] = all(
            v <= FP8_RATIO_LIMIT for v in ratios[label].values()
        )
        theirs = row("comfy", label)
        checks[f"{label} <= UNETLoader's"] = all(
            ours[unit][p] <= theirs[unit][p] * VS_COMFY_MARGIN for p in PHASES
        )
    mib = 1 << 20
    lines = [
        f"Peak {'VRAM (torch.cuda max allocated)' if gpu else 'RSS above the imports'} per phase, MiB; "
        f"device: {runs[0]['device']}; children run with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}. "
        f"Model: Lumina-2 width 2304, "
        f"{LUMINA2_RELEASED_WIDTH['num_layers']}+2+2 blocks "
        f"({runs[0]['parameters'] / 1e6:.0f} M parameters). Ratio = / LTModelLoader bf16.",
        "",
        "| loader | weight_dtype (file) | weights held | load | sampling step | training step |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        ours_bf16 = row("lt", "bf16")
        cells = [f"{r[unit][p] / mib:.0f} ({r[unit][p] / ours_bf16[unit][p]:.2f}x)" for p in PHASES]
        name = "LTModelLoader" if r["loader"] == "lt" else "UNETLoader"
        lines.append(f"| {name} | {r['weight_dtype']} ({r['file']}) | {r['weight_dtype_held']}, "
                     f"{r['weight_bytes'] / mib:.0f} MiB | " + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", "| target | met |", "|---|---|"] + [
        f"| {k} | {'yes' if v else 'NO'} |" for k, v in checks.items()
    ]
    if not gpu:
        lines += ["", "Peak VRAM: not measured (no CUDA device here); the same command reports it on a GPU."]
    base = quality["held_out"]["bf16"]
    quality_ok = {}
    lines += [
        "",
        f"LoRA quality (tiny Lumina-2, {QUALITY_STEPS} steps, same seed and data; held-out anchor velocity "
        f"loss of each LoRA on the bf16 model; untrained: {quality['untrained']:.4f})",
        "",
        "| base | held-out loss | vs bf16 base | within 5 % |",
        "|---|---|---|---|",
    ]
    for name, loss in quality["held_out"].items():
        quality_ok[name] = abs(loss - base) <= HELD_OUT_LIMIT * base
        lines.append(
            f"| {name} | {loss:.4f} | {loss / base - 1:+.1%} | {'yes' if quality_ok[name] else 'NO'} |"
        )
    return {
        "runs": runs,
        "malloc_mmap_threshold": MMAP_THRESHOLD,
        "ratios_vs_bf16": ratios,
        "checks": checks,
        "quality": quality,
        "quality_within_5_percent": quality_ok,
        "table": "\n".join(lines),
    }


# ---------------------------------------------------------------- child processes


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakMeter:
    """Peak resident size (and CUDA allocation) of one phase above the baseline taken at creation."""

    def __init__(self):
        import gc

        import torch

        gc.collect()
        self.cuda = torch.cuda.is_available()
        self.baseline = _status_bytes("VmRSS")
        self.cuda_baseline = torch.cuda.memory_allocated() if self.cuda else 0
        self.rss, self.vram, self.resident = {}, {} if self.cuda else None, {}

    def measure(self, phase: str, action):
        import torch

        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        value = action()
        if self.cuda:
            torch.cuda.synchronize()
            self.vram[phase] = torch.cuda.max_memory_allocated() - self.cuda_baseline
        self.rss[phase] = _status_bytes("VmHWM") - self.baseline
        self.resident[phase] = _status_bytes("VmRSS") - self.baseline
        return value


def synthetic_dataset(folder: Path, width: int):
    """A two-item CachedDataset (32x32 latents, 32-token captions) without a VAE or text encoder."""
    import safetensors.torch
    import torch

    from lumina_turbo.training.dataset import CachedDataset, DatasetItem

    gen = torch.Generator().manual_seed(0)
    items = []
    for index in range(2):
        latent, text = folder / f"latent{index}.safetensors", folder / f"text{index}.safetensors"
        safetensors.torch.save_file({"latent": torch.randn(16, 32, 32, generator=gen)}, str(latent))
        safetensors.torch.save_file({"cond": torch.randn(32, width, generator=gen)}, str(text))
        items.append(DatasetItem(f"image{index}.png", "synthetic", 1, (256, 256), str(latent), str(text)))
    return CachedDataset(items, str(folder / "text0.safetensors"), 0.0, 512, "synthetic", {})


def child(loader: str, weight_dtype: str, path: str, workdir: str) -> None:
    from lumina_turbo.devtools.comfy_host import bootstrap

    bootstrap()
    import comfy.model_management as mm
    import comfy.sample
    import folder_paths
    import nodes
    import torch

    torch.set_num_threads(1)
    from lumina_turbo.loading import model_files
    from lumina_turbo.training.config import TrainConfig
    from lumina_turbo.training.engine import LoraTrainer

    data_dir = Path(tempfile.mkdtemp(prefix="data-", dir=workdir))
    data = synthetic_dataset(data_dir, LUMINA2_RELEASED_WIDTH["cap_feat_dim"])
    folder_paths.add_model_folder_path("diffusion_models", str(Path(path).parent))
    meter = PeakMeter()

    def load():
        if loader == "comfy":
            return nodes.UNETLoader().load_unet(Path(path).name, weight_dtype)[0]
        return model_files.load_transformer_file(path, **model_files.weight_dtype_options(weight_dtype))

    model = meter.measure("load", load)
    weights = model.model.diffusion_model.state_dict()
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in weights.values()})

    def sampling_step():
        gen = torch.Generator().manual_seed(0)
        cond = [[torch.randn(1, 32, LUMINA2_RELEASED_WIDTH["cap_feat_dim"], generator=gen), {}]]
        latent = torch.zeros(1, 16, 32, 32)
        noise = torch.randn(latent.shape, generator=gen)
        with torch.inference_mode():
            return comfy.sample.sample(model, noise, 1, 1.0, "euler", "simple", cond, cond, latent, seed=0)

    meter.measure("sampling", sampling_step)
    mm.unload_all_models()
    config = TrainConfig(
        max_train_steps=1, network_dim=8, network_alpha=8.0, learning_rate=1e-4, batch_size=1,
        mixed_precision="bf16" if torch.cuda.is_available() else "fp32", gradient_checkpointing=True,
        save_every_n_steps=0, seed=0,
    )  # fmt: skip
    meter.measure("training", lambda: LoraTrainer(config, model, data).run())
    print(json.dumps({
        "rss": meter.rss, "vram": meter.vram, "resident_after": meter.resident, "device": str(mm.get_torch_device()),
        "weight_bytes": sum(t.numel() * t.element_size() for t in weights.values()),
        "weight_dtype_held": "+".join(dtypes), "parameters": sum(t.numel() for t in weights.values()),
    }))  # fmt: skip


def quality_child(workdir: str) -> None:
    from lumina_turbo.devtools.comfy_host import bootstrap

    bootstrap()
    import comfy.sd
    import torch

    torch.set_num_threads(1)
    from lumina_turbo.devtools import evaluate
    from lumina_turbo.devtools.example_dataset import write_concept_dataset
    from lumina_turbo.devtools.harness import MODELS_DIR
    from lumina_turbo.devtools.training_support import tiny_family
    from lumina_turbo.loading import model_files
    from lumina_turbo.samplers.schedules import anchor_sigmas
    from lumina_turbo.training.config import TrainConfig
    from lumina_turbo.training.dataset import build_from_folder
    from lumina_turbo.training.engine import LoraTrainer

    _, clip, vae = tiny_family("lumina2")
    work = Path(workdir)
    with torch.inference_mode():
        data = {
            name: build_from_folder(write_concept_dataset(work / name, count=count, seed=seed), vae=vae,
                                    clip=clip, cache_root=work / f"{name}-cache", resolution=64)
            for name, count, seed in (("train", 4, 0), ("held-out", 3, 1))
        }  # fmt: skip
    path = MODELS_DIR / "diffusion_models" / "tiny-random-lumina2.safetensors"
    bases = {
        name: model_files.load_transformer_file(path, **model_files.weight_dtype_options(name))
        for name in ("bf16", "fp8_e4m3fn", "fp8_e5m2")
    }
    config = TrainConfig(
        max_train_steps=QUALITY_STEPS, network_dim=8, network_alpha=8.0, learning_rate=3e-3, batch_size=2,
        mixed_precision="fp32", gradient_checkpointing=True, save_every_n_steps=0, seed=0,
    )  # fmt: skip
    anchors = anchor_sigmas(8, 3.0)[:-1]

    def held_out(model):
        return evaluate.anchor_velocity_losses(model, data["held-out"], anchors).mean().item()

    losses, train_losses = {}, {}
    for name, base in bases.items():
        result = LoraTrainer(config, base, data["train"]).run()
        on_bf16, _ = comfy.sd.load_lora_for_models(bases["bf16"], None, result.lora, 1.0, 0)
        losses[name] = held_out(on_bf16)
        train_losses[name] = [result.loss_history[0], result.loss_history[-1]]
    print(
        json.dumps(
            {"untrained": held_out(bases["bf16"]), "held_out": losses, "train_loss_first_last": train_losses}
        )
    )


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    elif len(sys.argv) == 3 and sys.argv[1] == "--quality":
        quality_child(sys.argv[2])
    else:
        sys.exit("run through `make bench BENCH=memory` (python -m benchmarks memory)")
