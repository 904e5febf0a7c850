"""fp8 weights the way ComfyUI stores them: fp8 storage casts and pre-quantized "scaled fp8" files.

Nothing here computes in fp8 or casts by hand. The model config's weight dtype is set to fp8 and
ComfyUI's ``pick_operations`` chooses its own layers: ``manual_cast`` (weights stay fp8, each layer
casts them to the device's compute dtype when it runs), ``fp8_ops`` for the ``_fast`` choice where
the GPU multiplies in fp8, and ``scaled_fp8_ops`` for files that carry ComfyUI's ``scaled_fp8``
marker (fp8 Linear weights, each with a ``scale_weight``: the real weight is ``weight * scale``).
"""

from __future__ import annotations

import math

import torch

# weight_dtype choices of ComfyUI's UNETLoader, in its order; "_fast" also multiplies in fp8 where
# the GPU can (ComfyUI's fp8_optimizations).
FP8_CHOICES = {
    "fp8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
    "fp8_e4m3fn_fast": getattr(torch, "float8_e4m3fn", None),
    "fp8_e5m2": getattr(torch, "float8_e5m2", None),
}
FAST_CHOICES = ("fp8_e4m3fn_fast",)
FP8_DTYPES = tuple({d for d in FP8_CHOICES.values() if d is not None})
MARKER = "scaled_fp8"  # the key ComfyUI's model detection pops from a transformer state dict
SCALE_SUFFIXES = (".scale_weight", ".scale_input")


def is_fp8(dtype) -> bool:
    return dtype is not None and dtype in FP8_DTYPES


def storage_problem(dtype: torch.dtype | None, device=None) -> str | None:
    """Why weights of ``dtype`` cannot be stored for ``device`` (ComfyUI's load device), or None."""
    if not is_fp8(dtype):
        return None
    import comfy.model_management as mm

    device = device if device is not None else mm.get_torch_device()
    if not mm.supports_cast(device, dtype):
        return f"ComfyUI cannot store {dtype} weights for {device} (torch {torch.__version__})"
    return None


def choice_problem(name: str, device=None) -> str | None:
    """Why the weight_dtype choice ``name`` cannot be used here, or None (also None for non-fp8 names)."""
    if name not in FP8_CHOICES:
        return None
    if FP8_CHOICES[name] is None:
        return f"{name} needs fp8 tensors, which torch {torch.__version__} does not have; choose bf16 or fp16"
    problem = storage_problem(FP8_CHOICES[name], device)
    return f"{name}: {problem}; choose bf16 or fp16" if problem else None


def marker_settings(marker: torch.Tensor | None) -> tuple[torch.dtype, bool] | None:
    """(fp8 dtype of the Linear weights, fp8_optimizations) from a ``scaled_fp8`` marker (tensor or
    header entry), as ``comfy.model_detection.model_config_from_unet`` reads it; None without one."""
    if marker is None:
        return None
    dtype = torch.float8_e4m3fn if marker.dtype == torch.float32 else marker.dtype
    return dtype, math.prod(marker.shape) != 2


def split_scales(state_dict: dict) -> tuple[dict, dict]:
    """(weights, scales): the ``scale_weight`` / ``scale_input`` tensors of a scaled-fp8 file apart."""
    scales = {k: v for k, v in state_dict.items() if k.endswith(SCALE_SUFFIXES)}
    return {k: v for k, v in state_dict.items() if k not in scales}, scales


def check_scales(weights: dict, scales: dict, linear_modules: set[str], weight_dtype: torch.dtype) -> None:
    """Raise ValueError unless every Linear weight stored in fp8 has a scalar float ``scale_weight``
    and every scale belongs to a Linear layer (what ``scaled_fp8_ops`` reads). Tensors or header
    entries (anything with ``dtype`` and ``shape``), so a file can be checked before it is read."""
    for key, scale in scales.items():
        module = key.rsplit(".", 1)[0]
        if module not in linear_modules:
            raise ValueError(f"{key!r} scales {module!r}, which is not a Linear layer of the model")
        if math.prod(scale.shape) != 1 or not scale.dtype.is_floating_point or len(scale.shape) > 1:
            raise ValueError(
                f"{key!r} has shape {tuple(scale.shape)} and dtype {scale.dtype}; "
                "expected one float per layer (shape () or (1,), as ComfyUI's scaled fp8 layers hold)"
            )
    unscaled = sorted(
        module
        for module in linear_modules
        if weights[f"{module}.weight"].dtype == weight_dtype and f"{module}.scale_weight" not in scales
    )
    if unscaled:
        raise ValueError(
            f"{len(unscaled)} fp8 Linear weight(s) without their scale: '{unscaled[0]}.scale_weight' "
            f"is missing; a scaled-fp8 file holds one '<layer>.scale_weight' per {weight_dtype} Linear weight"
        )
