"""Conventions and small helpers shared by every loss in this package.

Time convention (all of losses/): **ComfyUI sigma**, 1 = pure noise, 0 = data.

    x_sigma = (1 - sigma) * x0 + sigma * eps          (rectified-flow interpolation)
    v       = d x_sigma / d sigma = eps - x0          (the training target velocity)
    x0      = x_sigma - sigma * v                     (ComfyUI CONST: denoised = x - sigma * v)

Lumina's t is 1 - sigma; a diffusers timestep is 1000 * sigma. Trainers that negate the DiT output
(AC-RF, ai-toolkit: ``model_pred = -transformer(...)``) produce this v.

Every loss returns one value per sample (shape [B]) so that Min-SNR weights and the replay buffer can
act per sample; :func:`reduce_loss` turns that into the scalar to backpropagate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64: bf16/fp16 losses lose too much precision."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def check_same_shape(**tensors: torch.Tensor) -> torch.Size:
    """Raise ValueError unless all named tensors are tensors of one shape with a batch dimension."""
    shape = None
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.ndim < 2:
            raise ValueError(f"{name} must have a batch dimension and data, got shape {tuple(tensor.shape)}")
        if shape is None:
            shape = tensor.shape
        elif tensor.shape != shape:
            names = ", ".join(tensors)
            raise ValueError(
                f"{names} must have the same shape, got {[tuple(t.shape) for t in tensors.values()]}"
            )
    return shape


def per_sample_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: [B, ...] -> [B]."""
    return values.reshape(values.shape[0], -1).mean(dim=1)


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 - cos(flat pred, flat target), in [0, 2]; 0 for parallel vectors.

    A zero vector has cosine 0 (distance 1) by torch's eps convention.
    """
    flat_pred = pred.reshape(pred.shape[0], -1)
    flat_target = target.reshape(target.shape[0], -1)
    return 1 - F.cosine_similarity(flat_pred, flat_target, dim=1, eps=1e-8)


def reduce_loss(per_sample: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar training loss: mean_b(w_b * L_b) over the batch (w = 1 when ``weights`` is None).

    Each sample keeps its own weight (Min-SNR, replay); AC-RF instead multiplied the batch loss by
    the batch-mean weight, which mixes samples' weights.
    """
    if per_sample.ndim != 1:
        raise ValueError(f"per_sample losses must have shape [B], got {tuple(per_sample.shape)}")
    if weights is None:
        return per_sample.mean()
    weights = torch.as_tensor(weights, device=per_sample.device, dtype=per_sample.dtype)
    if weights.shape != per_sample.shape:
        raise ValueError(f"weights must have shape {tuple(per_sample.shape)}, got {tuple(weights.shape)}")
    return (weights * per_sample).mean()
