"""The flow-matching conventions every other module uses, defined once.

Time convention: **ComfyUI sigma**, 1 = pure noise, 0 = data.

    x_sigma  = (1 - sigma) * x0 + sigma * noise      (rectified-flow interpolation)
    v        = d x_sigma / d sigma = noise - x0      (the velocity; ComfyUI CONST: v = (x - denoised) / sigma)
    denoised = x_sigma - sigma * v

Lumina's t is 1 - sigma; a diffusers timestep is 1000 * sigma. Trainers that negate the DiT output
(AC-RF, ai-toolkit: ``model_pred = -transformer(...)``) produce this v.
"""

from __future__ import annotations

import math
from numbers import Real

import torch


def check_shift(shift, name: str = "shift") -> float:
    """Return ``shift`` as a float, or raise ValueError unless it is a finite number > 0.

    The shift acts on ComfyUI sigma (1 = noise); shift > 1 spends more steps near the noise end.
    """
    if isinstance(shift, bool) or not isinstance(shift, Real) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {shift!r}")
    return float(shift)


def time_shift(sigma, shift):
    """Rational time shift ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)`` on ComfyUI sigma.

    Equals comfy.model_sampling.time_snr_shift; in Lumina's t = 1 - sigma it is Lumina's
    ``t / (t + shift - shift * t)``; diffusers/SD3/Flux call it the static shift. It fixes 0 and 1 and
    is monotone; shift > 1 moves sigmas towards the noise end. Floats and tensors (type kept).
    """
    shift = check_shift(shift)
    if shift == 1.0:
        return sigma
    return shift * sigma / (1 + (shift - 1) * sigma)


def per_sample_sigma(sigma, batch_size: int, *, like: torch.Tensor | None = None) -> torch.Tensor:
    """ComfyUI sigma (1 = noise, 0 = data) as a float tensor of shape [batch_size], checked to lie in [0, 1].

    Accepts a Python number, a 0-d tensor, or a tensor of shape [B] / [B, 1, ...]. ``like`` gives the
    device and dtype (at least float32) of the result.
    """
    device = like.device if like is not None else None
    dtype = torch.promote_types(like.dtype, torch.float32) if like is not None else torch.float32
    sigma = torch.as_tensor(sigma, device=device, dtype=dtype)
    if sigma.numel() == 1:
        sigma = sigma.reshape(()).expand(batch_size)
    elif sigma.shape[0] == batch_size and sigma[0].numel() == 1:
        sigma = sigma.reshape(batch_size)
    else:
        raise ValueError(
            f"sigma must be a number or have one value per sample ({batch_size}), got shape {tuple(sigma.shape)}"
        )
    if not torch.isfinite(sigma).all() or (sigma < 0).any() or (sigma > 1).any():
        raise ValueError(f"sigma must lie in [0, 1] (ComfyUI sigma, 1 = noise), got {sigma.tolist()}")
    return sigma


def expand_per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a [B] tensor as [B, 1, 1, ...] so it broadcasts against ``like``."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def _broadcast(sigma, like: torch.Tensor) -> torch.Tensor:
    # Sampling hot path: no range check (that would synchronise the GPU on every model call).
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device).reshape(-1)
    if sigma.numel() not in (1, like.shape[0]):
        raise ValueError(
            f"sigma must be a number or one value per sample ({like.shape[0]}), got {sigma.numel()}"
        )
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))


def noisy_latent(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """x_sigma = (1 - sigma) * x0 + sigma * noise; ``sigma`` a number or one ComfyUI sigma per sample."""
    sigma = expand_per_sample(per_sample_sigma(sigma, x0.shape[0], like=x0), x0)
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = noise - x0 = d x_sigma / d sigma, the same at every ComfyUI sigma along one pair."""
    return noise - x0


def velocity_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """v = (x - denoised) / sigma at ComfyUI sigma (a number or one value per sample, > 0).

    Undefined at sigma = 0, where ComfyUI never calls the model.
    """
    return (x - denoised) / _broadcast(sigma, x)


def denoised_from_velocity(x: torch.Tensor, velocity: torch.Tensor, sigma) -> torch.Tensor:
    """denoised = x - sigma * v (ComfyUI CONST); the inverse of :func:`velocity_from_denoised`.

    Well conditioned for every sigma in [0, 1]: an error in v reaches x0 multiplied by sigma <= 1.
    """
    return x - _broadcast(sigma, x) * velocity
