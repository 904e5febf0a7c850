"""Write a pre-quantized "scaled fp8" transformer file from a ComfyUI-named one, by ComfyUI's conventions.

What ComfyUI reads (``comfy.model_detection`` and ``comfy.ops.scaled_fp8_ops``): a ``scaled_fp8``
marker tensor whose dtype is the fp8 dtype (an empty one, as ``model_base.state_dict_for_saving``
writes it, also turns on ``fp8_optimizations``); every Linear weight in fp8 beside a float32
``<layer>.scale_weight`` with ``weight ≈ fp8_weight * scale_weight``; every other tensor in a
regular dtype. Per-tensor scale = max |w| / the fp8 format's largest finite value.
"""

from __future__ import annotations

from pathlib import Path

import torch


def quantize(weight: torch.Tensor, dtype=torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scalar scale) with ``fp8 * scale ≈ weight``."""
    scale = weight.abs().max().float() / torch.finfo(dtype).max
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (weight.float() / scale).to(dtype), scale.reshape(())


def _write(tensors: dict, is_linear_weight, target, other_dtype, fp8_dtype) -> Path:
    import safetensors.torch

    out = {"scaled_fp8": torch.empty(0, dtype=fp8_dtype)}
    for key, tensor in tensors.items():
        if is_linear_weight(key):
            out[key], out[key[: -len("weight")] + "scale_weight"] = quantize(tensor, fp8_dtype)
        else:
            out[key] = tensor.to(other_dtype) if tensor.is_floating_point() else tensor
    safetensors.torch.save_file(out, str(target))
    return Path(target)


def write_scaled_fp8(
    source: str | Path, target: str | Path, other_dtype=torch.bfloat16, fp8_dtype=torch.float8_e4m3fn
) -> Path:
    """``source``: a ComfyUI-named NextDiT file; ``target`` gets its scaled-fp8 form."""
    import safetensors.torch

    from lumina_turbo.loading import nextdit_config

    tensors = safetensors.torch.load_file(str(source))
    linears = nextdit_config.linear_modules(nextdit_config.unet_config_from_state_dict(tensors))

    def is_linear_weight(key):
        return key.endswith(".weight") and key.rsplit(".", 1)[0] in linears

    return _write(tensors, is_linear_weight, target, other_dtype, fp8_dtype)


def write_scaled_fp8_text_encoder(
    source: str | Path, target: str | Path, other_dtype=torch.bfloat16, fp8_dtype=torch.float8_e4m3fn
) -> Path:
    """``source``: an HF-named Gemma-2 / Qwen3 text encoder file; its attention and MLP projections
    (the Linear layers of ComfyUI's Llama-style models) become scaled fp8."""
    import safetensors.torch

    tensors = safetensors.torch.load_file(str(source))
    return _write(tensors, lambda key: key.endswith("_proj.weight"), target, other_dtype, fp8_dtype)
