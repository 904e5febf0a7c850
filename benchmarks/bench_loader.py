"""Loader memory and speed: LTModelLoader's transformer loading vs ComfyUI's own UNETLoader.

Two random-weight models are written to a temporary folder (nothing trained, nothing downloaded):

* a Z-Image-shaped diffusers ``transformer/`` folder (dim 1024, 12 layers, bf16, 5 shards with an
  index json, ~380 MB) -- ComfyUI cannot load diffusers folders, so only our loader is measured;
* a Lumina-Image-2.0-shaped ComfyUI single file at the released width (dim 2304, 24/8 heads) with
  one main layer instead of 26, fp32 (~1.7 GB) -- ComfyUI detects the architecture only at the
  released widths; the layer count it reads from the keys. fp32, because ComfyUI's UNETLoader
  loads in fp32 on a CPU whatever the file holds, so both loaders do the same work.

Every measurement runs in a fresh subprocess: imports first, then the peak resident set size
(VmHWM) is reset through ``/proc/self/clear_refs`` and the load is timed. "extra RSS" is peak minus
the resident size after imports, divided by the tensor bytes in the files. Repeats are interleaved
(ours, ComfyUI's, ours, ...) with a warm page cache for both; medians are reported.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPEATS = 7
RSS_LIMIT = 1.3
TIME_LIMIT = 1.2

ZIMAGE_SHAPED = {
    "dim": 1024, "n_layers": 12, "n_refiner_layers": 1, "n_heads": 8, "n_kv_heads": 8, "cap_feat_dim": 1024,
    "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
}  # fmt: skip
LUMINA2_RELEASED_WIDTH = {
    "hidden_size": 2304, "num_layers": 1, "num_refiner_layers": 2, "num_attention_heads": 24, "num_kv_heads": 8,
    "multiple_of": 256, "ffn_dim_multiplier": None, "axes_dim_rope": [32, 32, 32], "axes_lens": [300, 512, 512],
    "cap_feat_dim": 2304,
}  # fmt: skip


def _random_tensors(shapes: dict, dtype, seed: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=gen) * 0.02).to(dtype) for k, s in shapes.items()}


def write_zimage_folder(folder: Path, n_shards: int = 5) -> Path:
    """A diffusers ``transformer/`` folder laid out like ``save_pretrained(max_shard_size=...)``."""
    import safetensors.torch
    import torch
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**ZIMAGE_SHAPED)
    tdir = folder / "transformer"
    tdir.mkdir(parents=True)
    model.save_config(tdir)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = list(shapes)
    weight_map = {}
    for i in range(n_shards):
        part = names[i * len(names) // n_shards : (i + 1) * len(names) // n_shards]
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = _random_tensors({k: shapes[k] for k in part}, torch.bfloat16, seed=i)
        safetensors.torch.save_file(tensors, str(tdir / shard))
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (tdir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return folder


def write_lumina2_file(path: Path) -> Path:
    """ComfyUI-named NextDiT weights at Lumina-2's released width, fp32."""
    import safetensors.torch
    import torch
    from diffusers import Lumina2Transformer2DModel

    from lumina_turbo.loading.nextdit_keys import diffusers_to_comfy

    with torch.device("meta"):
        model = Lumina2Transformer2DModel(**LUMINA2_RELEASED_WIDTH)
    shapes = {k: tuple(v.shape) for k, v in diffusers_to_comfy(model.state_dict()).items()}
    safetensors.torch.save_file(_random_tensors(shapes, torch.float32, seed=7), str(path))
    return path


def tensor_bytes(paths) -> int:
    from lumina_turbo.loading.safetensors_io import read_header

    return sum(info.end - info.start for p in paths for info in read_header(p).values())


def measure(mode: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run() -> dict:
    from lumina_turbo.loading.safetensors_io import folder_files

    with tempfile.TemporaryDirectory(prefix="lt-bench-loader-") as work:
        work = Path(work)
        folder = write_zimage_folder(work / "zimage-shaped")
        single = write_lumina2_file(work / "lumina2-released-width.safetensors")
        folder_bytes = tensor_bytes(folder_files(folder / "transformer"))
        file_bytes = tensor_bytes([single])
        for path in [*folder_files(folder / "transformer"), single]:  # warm the page cache for everyone
            path.read_bytes()
        runs = {"lt_folder": [], "lt_file": [], "comfy_file": []}
        for _ in range(REPEATS):
            for mode in runs:
                runs[mode].append(measure(mode, folder if mode == "lt_folder" else single))

    result_load = " / ".join(f"{x:.1f}" for x in os.getloadavg())

    def med(mode, key):
        return statistics.median(r[key] for r in runs[mode])

    result = {
        "folder": {"tensor_bytes": folder_bytes, "shards": 5, "dtype": "bf16", "config": ZIMAGE_SHAPED},
        "single_file": {"tensor_bytes": file_bytes, "dtype": "fp32", "config": LUMINA2_RELEASED_WIDTH},
        "runs": runs,
        "load_average": result_load,
        "folder_rss_ratio": med("lt_folder", "extra_rss") / folder_bytes,
        "file_rss_ratio_ours": med("lt_file", "extra_rss") / file_bytes,
        "file_rss_ratio_comfy": med("comfy_file", "extra_rss") / file_bytes,
        "seconds_ours": med("lt_file", "seconds"),
        "seconds_comfy": med("comfy_file", "seconds"),
        "cpu_seconds_ours": med("lt_file", "cpu_seconds"),
        "cpu_seconds_comfy": med("comfy_file", "cpu_seconds"),
        "best_seconds_ours": min(r["seconds"] for r in runs["lt_file"]),
        "best_seconds_comfy": min(r["seconds"] for r in runs["comfy_file"]),
    }
    result["time_ratio"] = result["seconds_ours"] / result["seconds_comfy"]
    result["cpu_time_ratio"] = result["cpu_seconds_ours"] / result["cpu_seconds_comfy"]
    result["rss_ok"] = result["folder_rss_ratio"] <= RSS_LIMIT
    result["time_ok"] = result["time_ratio"] <= TIME_LIMIT
    gib = 1 << 30
    result["table"] = "\n".join(
        [
            f"Medians of {REPEATS} interleaved runs, each in a fresh process (CPU, warm page cache).",
            "",
            "| load | tensors | LTModelLoader | ComfyUI UNETLoader | limit |",
            "|---|---|---|---|---|",
            f"| peak extra RSS / tensor bytes, sharded diffusers folder (Z-Image-shaped, bf16, 5 shards) "
            f"| {folder_bytes / gib:.2f} GiB | {result['folder_rss_ratio']:.2f}x | cannot load folders "
            f"| <= {RSS_LIMIT}x |",
            f"| peak extra RSS / tensor bytes, single file (Lumina-2 width 2304, fp32) | {file_bytes / gib:.2f} GiB "
            f"| {result['file_rss_ratio_ours']:.2f}x | {result['file_rss_ratio_comfy']:.2f}x | |",
            f"| load time (median), same single file | {file_bytes / gib:.2f} GiB | {result['seconds_ours']:.2f} s "
            f"| {result['seconds_comfy']:.2f} s | ours / ComfyUI = {result['time_ratio']:.2f} (<= {TIME_LIMIT}) |",
            f"| fastest of the {REPEATS} loads | | {result['best_seconds_ours']:.2f} s "
            f"| {result['best_seconds_comfy']:.2f} s | ours / ComfyUI = "
            f"{result['best_seconds_ours'] / result['best_seconds_comfy']:.2f} |",
            f"| CPU time of the load (median, all threads) | | {result['cpu_seconds_ours']:.2f} s "
            f"| {result['cpu_seconds_comfy']:.2f} s | ours / ComfyUI = {result['cpu_time_ratio']:.2f} |",
            "",
            f"Load average while measuring: {result['load_average']} (2-core machine shared with other jobs; "
            "wall times move with it, CPU times much less).",
        ]
    )
    return result


# ---------------------------------------------------------------- child process


def _peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(mode: str, path: str) -> None:
    import gc
    import time

    from lumina_turbo.devtools.comfy_host import bootstrap

    bootstrap()
    import comfy.sd

    from lumina_turbo.loading import model_files

    load = {
        "lt_folder": model_files.load_transformer_folder,
        "lt_file": model_files.load_transformer_file,
        "comfy_file": comfy.sd.load_diffusion_model,  # what UNETLoader calls (weight_dtype "default")
    }[mode]
    gc.collect()
    baseline = _status_bytes("VmRSS")
    if not _peak_rss_reset():
        import resource

        baseline = max(baseline, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    start, cpu_start = time.perf_counter(), time.process_time()
    patcher = load(path)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _status_bytes("VmHWM")
    weights = patcher.model.diffusion_model.state_dict()
    print(json.dumps({
        "seconds": seconds, "cpu_seconds": cpu_seconds, "extra_rss": peak - baseline, "baseline_rss": baseline,
        "weight_bytes": sum(t.numel() * t.element_size() for t in weights.values()),
        "dtype": str(next(iter(weights.values())).dtype),
    }))  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        sys.exit("run through `make bench BENCH=loader` (python -m benchmarks loader)")
