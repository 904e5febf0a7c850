"""Write a LoRA file: ComfyUI-native or kohya keys, a chosen dtype, training metadata, atomically.

``comfyui``: ``diffusion_model.<module>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha`` - the
keys ComfyUI's own TrainLoraNode writes and its generic key map loads.
``kohya``: ``lora_unet_<module with _>.lora_up.weight`` ... - the sd-scripts/musubi-after-conversion
names, which ComfyUI also loads. Alpha stays a float32 scalar in every format.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .cache import atomic_save_safetensors

SAVE_FORMATS = ("comfyui", "kohya")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NATIVE_PREFIX = "diffusion_model."


def convert_keys(lora: dict[str, torch.Tensor], key_format: str) -> dict[str, torch.Tensor]:
    if key_format == "comfyui":
        return dict(lora)
    if key_format != "kohya":
        raise ValueError(f"format must be one of {SAVE_FORMATS}, got {key_format!r}")
    out = {}
    for key, tensor in lora.items():
        if not key.startswith(_NATIVE_PREFIX):
            raise ValueError(f"lora: key {key!r} is not a ComfyUI-native diffusion_model key")
        stem, _, suffix = key[len(_NATIVE_PREFIX) :].rpartition(".lora_")
        if stem:
            out[f"lora_unet_{stem.replace('.', '_')}.lora_{suffix}"] = tensor
        else:
            module, _, last = key[len(_NATIVE_PREFIX) :].rpartition(".")
            out[f"lora_unet_{module.replace('.', '_')}.{last}"] = tensor
    return out


def prepare_tensors(lora: dict[str, torch.Tensor], dtype: str, key_format: str) -> dict[str, torch.Tensor]:
    if not isinstance(lora, dict) or not lora or not all(isinstance(v, torch.Tensor) for v in lora.values()):
        raise ValueError(
            "lora: expected a LORA_MODEL (a dict of tensors) from LTLoraTrainer or TrainLoraNode"
        )
    target = DTYPES[dtype]
    tensors = {}
    for key, tensor in convert_keys(lora, key_format).items():
        keep = key.endswith(".alpha") or not tensor.is_floating_point()
        tensors[key] = tensor.detach().to(
            "cpu", torch.float32 if key.endswith(".alpha") else (tensor.dtype if keep else target)
        )
    return tensors


def next_free_path(folder: Path, prefix: str) -> Path:
    """``<folder>/<prefix>_00001_.safetensors`` with the first unused counter (SaveImage-style)."""
    prefix = prefix.replace("\\", "/").strip("/")
    directory = (Path(folder) / prefix).parent
    base = Path(prefix).name
    directory.mkdir(parents=True, exist_ok=True)
    taken = set(os.listdir(directory))
    counter = 1
    while f"{base}_{counter:05}_.safetensors" in taken:
        counter += 1
    return directory / f"{base}_{counter:05}_.safetensors"


def save_lora_file(
    lora,
    folder,
    prefix: str,
    *,
    dtype: str = "bf16",
    key_format: str = "comfyui",
    metadata: dict | None = None,
    exact_path: Path | None = None,
) -> Path:
    """Write ``lora`` under ``folder`` (or to ``exact_path``); returns the file written."""
    tensors = prepare_tensors(lora, dtype, key_format)
    info = {str(k): str(v) for k, v in (getattr(lora, "metadata", None) or {}).items()}
    info.update({str(k): str(v) for k, v in (metadata or {}).items()})
    info.update({"lumina_turbo.format": key_format, "lumina_turbo.dtype": dtype})
    path = Path(exact_path) if exact_path else next_free_path(Path(folder), prefix)
    folder_resolved = Path(folder).resolve() if folder else None
    if folder_resolved and exact_path is None and folder_resolved not in path.resolve().parents:
        raise ValueError(f"filename_prefix: {prefix!r} leaves {folder}")
    atomic_save_safetensors(tensors, path, metadata=info, durable=True)
    return path
