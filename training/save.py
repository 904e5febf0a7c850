"""Write a LoRA file: ComfyUI-native, kohya or diffusers keys, a chosen dtype, training metadata, atomically.

``comfyui``: ``diffusion_model.<module>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha`` - the
keys ComfyUI's own TrainLoraNode writes and its generic key map loads.
``kohya``: ``lora_unet_<module with _>.lora_up.weight`` ... - the sd-scripts/musubi-after-conversion
names, which ComfyUI also loads. Alpha stays a float32 scalar in both.
``diffusers``: the PEFT layout diffusers' ``load_lora_weights`` reads: ``transformer.<diffusers
module>.lora_A.weight`` / ``.lora_B.weight`` with each family's diffusers module names (the tables of
``models.nextdit_keys``). The fused ``attention.qkv`` becomes ``to_q``/``to_k``/``to_v``: each gets
the shared down matrix as ``lora_A`` and its own rows of the up matrix as ``lora_B``, which is the
same update row for row. PEFT files carry no alpha (a loader then uses scale 1, as diffusers and
ComfyUI both do), so ``alpha / rank`` is folded into ``lora_B``; the network alpha stays in the
metadata. LTLoraLoader reads this layout for both families; ComfyUI 0.3.75's stock LoraLoader does
not (it maps diffusers names only under ``diffusion_model.``, and for Z-Image only): use ``comfyui``
for ComfyUI.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..loading import nextdit_keys
from ..lora.keys import qkv_slices
from .cache import atomic_save_safetensors

SAVE_FORMATS = ("comfyui", "kohya", "diffusers")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FAMILY_KEY = "lumina_turbo.family"
_NATIVE_PREFIX = "diffusion_model."
_DIFFUSERS_PREFIX = "transformer."
_UP, _DOWN, _ALPHA = ".lora_up.weight", ".lora_down.weight", ".alpha"


def _kohya(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def lora_family(lora) -> str:
    """``"lumina2"`` / ``"zimage"``: from the trainer's metadata, else from an adaLN module's index."""
    family = (getattr(lora, "metadata", None) or {}).get(FAMILY_KEY)
    if family in nextdit_keys.FAMILIES:
        return family
    if any(".adaLN_modulation.0." in key for key in lora):
        return nextdit_keys.ZIMAGE
    if any(".adaLN_modulation.1." in key for key in lora):
        return nextdit_keys.LUMINA2
    raise ValueError(
        f"format diffusers: cannot tell whether this LoRA is for Lumina-2 or Z-Image (no {FAMILY_KEY} "
        "metadata, no adaLN module); save it as comfyui or kohya"
    )


def _diffusers_names(family: str) -> dict[str, str | tuple[str, ...]]:
    """ComfyUI module name -> diffusers module name (or the q/k/v triple), for blocks and top level."""
    top, block, qkv = nextdit_keys.module_renames(family)
    names: dict[str, str | tuple[str, ...]] = {}
    for table, prefix in ((block, "block:"), (top, "")):
        for diffusers_name, comfy_name in table.items():
            names.setdefault(prefix + comfy_name, diffusers_name)
    names["block:" + nextdit_keys.QKV_MODULE] = qkv
    return names


def _diffusers_module(module: str, names: dict) -> str | tuple[str, ...]:
    parts = module.split(".", 2)
    if len(parts) == 3 and parts[0] in nextdit_keys.BLOCK_STACKS and parts[1].isdigit():
        found = names.get("block:" + parts[2])
        if isinstance(found, tuple):
            return tuple(f"{parts[0]}.{parts[1]}.{name}" for name in found)
        return f"{parts[0]}.{parts[1]}.{found}" if found else None
    return names.get(module)


def _diffusers(lora, family: str) -> dict[str, torch.Tensor]:
    names = _diffusers_names(family)
    stems = {}
    for key in lora:
        if not key.startswith(_NATIVE_PREFIX) or not key.endswith((_UP, _DOWN, _ALPHA)):
            raise ValueError(
                f"format diffusers: {key!r} is not part of a ComfyUI-native LoRA up/down pair (PEFT files "
                "hold only those); save it as comfyui or kohya"
            )
        stem = key[len(_NATIVE_PREFIX) :]
        stems.setdefault(stem[: stem.rfind(".lora_")] if ".lora_" in stem else stem[: -len(_ALPHA)], None)
    out = {}
    for module in stems:
        up, down = lora.get(f"{_NATIVE_PREFIX}{module}{_UP}"), lora.get(f"{_NATIVE_PREFIX}{module}{_DOWN}")
        if up is None or down is None:
            raise ValueError(f"format diffusers: {module} has no lora_up/lora_down pair")
        alpha = lora.get(f"{_NATIVE_PREFIX}{module}{_ALPHA}")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        up = up.float() * scale if scale != 1.0 else up
        target = _diffusers_module(module, names)
        if target is None:
            raise ValueError(f"format diffusers: {module} has no diffusers {family} module name")
        if isinstance(target, tuple):  # fused qkv -> to_q / to_k / to_v rows, the same down matrix
            slices = qkv_slices((up.shape[0], down.shape[1]))
            for name, part in zip(target, ("q", "k", "v"), strict=True):
                offset, rows = slices[part]
                # safetensors refuses tensors that share memory: each projection gets its own copy
                out[f"{_DIFFUSERS_PREFIX}{name}.lora_A.weight"] = down.clone()
                out[f"{_DIFFUSERS_PREFIX}{name}.lora_B.weight"] = up[offset : offset + rows].clone()
        else:
            out[f"{_DIFFUSERS_PREFIX}{target}.lora_A.weight"] = down
            out[f"{_DIFFUSERS_PREFIX}{target}.lora_B.weight"] = up
    return out


def convert_keys(lora: dict[str, torch.Tensor], key_format: str) -> dict[str, torch.Tensor]:
    if key_format == "comfyui":
        return dict(lora)
    if key_format == "kohya":
        return _kohya(lora)
    if key_format == "diffusers":
        return _diffusers(lora, lora_family(lora))
    raise ValueError(f"format must be one of {SAVE_FORMATS}, got {key_format!r}")


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
    root = Path(folder).resolve()
    resolved = directory.resolve()  # symlinks of existing folders included, before anything is created
    if resolved != root and root not in resolved.parents:
        raise ValueError(f"filename_prefix: {prefix!r} leaves {folder}")
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
