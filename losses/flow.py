"""The hybrid flow-matching loss on velocities (the ``standard`` loss mode's base terms).

Time convention: ComfyUI sigma (1 = noise, 0 = data), x_sigma = (1 - sigma) x0 + sigma eps and the
target v = eps - x0 (denoised = x - sigma v). Lumina t = 1 - sigma; diffusers timestep = 1000 sigma.
"""

from __future__ import annotations

import torch

from .common import check_same_shape, compute_dtype, cosine_distance, per_sample_mean


def hybrid_flow_loss(
    pred_v: torch.Tensor,
    target_v: torch.Tensor,
    *,
    lambda_mse: float = 1.0,
    lambda_l1: float = 0.0,
    lambda_cos: float = 0.0,
) -> torch.Tensor:
    """Per-sample hybrid flow loss in velocity space, shape [B].

        L_b = lambda_mse * mean((v̂ - v)^2) + lambda_l1 * mean(|v̂ - v|) + lambda_cos * (1 - cos(v̂_b, v_b))

    with means and the cosine over all of one sample's elements. The L1 term fits the magnitude
    robustly and the cosine term the direction of the velocity field (the AC-RF write-up's "hybrid flow-matching loss":
    L1 + cosine). Velocities follow the ComfyUI convention: v = eps - x0, sigma 1 = noise.

    Defaults follow AC-RF's ``standard`` mode ("basic MSE + optional cosine"): plain MSE. AC-RF's
    ``config/acrf_config.toml`` used lambda_l1 = 1.0, lambda_cos = 0.1 with no MSE term.
    """
    check_same_shape(pred_v=pred_v, target_v=target_v)
    dtype = compute_dtype(pred_v, target_v)
    pred_v, target_v = pred_v.to(dtype), target_v.to(dtype)
    error = pred_v - target_v
    loss = pred_v.new_zeros(pred_v.shape[0])
    if lambda_mse:
        loss = loss + lambda_mse * per_sample_mean(error.square())
    if lambda_l1:
        loss = loss + lambda_l1 * per_sample_mean(error.abs())
    if lambda_cos:
        loss = loss + lambda_cos * cosine_distance(pred_v, target_v)
    return loss
