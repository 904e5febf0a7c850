"""Curvature penalty: a finite-difference second derivative of the flow trajectory in sigma.

Time convention: ComfyUI sigma (1 = noise, 0 = data); Lumina t = 1 - sigma; diffusers timestep =
1000 sigma. Along x_sigma = (1 - sigma) x0 + sigma eps the trajectory's first derivative is
dx/dsigma = v (the model's velocity), so its second derivative is dv/dsigma. A straight (constant-velocity)
trajectory has dv/dsigma = 0; that is what Euler sampling with few steps needs.

Definition used here. Given the model's velocity at three distinct sigmas s0 (the training sigma,
prediction v0 with gradient) and two neighbours s1, s2 (predictions v1, v2, by default detached),
the second derivative is estimated by twice the second divided difference

    D2 = 2 * ( v0/((s0-s1)(s0-s2)) + v1/((s1-s0)(s1-s2)) + v2/((s2-s0)(s2-s1)) )

which is exact for quadratics and valid for uneven spacing (a one-sided stencil near sigma 0 or 1).
The penalty is the mean square of that derivative scaled by step^2, per sample:

    L_b = mean_elements((step^2 * D2)^2)

For the centred stencil s1 = s0 - step, s2 = s0 + step, step^2 D2 = v1 - 2 v0 + v2, so this is exactly
AC-RF v2's ``mean((v+ - 2 v̂ + v-)^2)``. The neighbour inputs x_{s1}, x_{s2} are built from the same
(x0, eps) as the training input (:func:`samplers.flow.noisy_latent`), which costs two more forward
passes (run them under no_grad: AC-RF lets only the centre prediction carry gradient).
"""

from __future__ import annotations

import torch

from ..samplers.flow import expand_per_sample, per_sample_sigma
from .common import check_same_shape, per_sample_mean

CURVATURE_SIGMA_RANGE = (0.001, 0.999)


def default_curvature_step(anchors) -> float:
    """AC-RF v2's step: |anchors[0] - anchors[-1]| / (N - 1), the mean anchor spacing (ComfyUI sigma)."""
    anchors = torch.as_tensor(anchors, dtype=torch.float64).flatten()
    if anchors.numel() < 2:
        raise ValueError(f"need at least 2 anchors for a curvature step, got {anchors.numel()}")
    return float((anchors[0] - anchors[-1]).abs() / (anchors.numel() - 1))


def curvature_neighbour_sigmas(
    sigma,
    step: float,
    *,
    min_sigma: float = CURVATURE_SIGMA_RANGE[0],
    max_sigma: float = CURVATURE_SIGMA_RANGE[1],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two neighbour sigmas (s1, s2) of each training sigma for :func:`curvature_penalty`.

    Centred (sigma - step, sigma + step) when both fit in [min_sigma, max_sigma]; otherwise one-sided
    toward the inside: (sigma - step, sigma - 2 step) near the noise end, (sigma + step, sigma + 2 step)
    near the data end, so the spacing stays ``step`` (AC-RF clamped instead, which can collapse a
    neighbour onto sigma). ComfyUI sigma (1 = noise). Requires 0 < step <= (max - min) / 4.
    """
    if not 0 < float(step) <= (max_sigma - min_sigma) / 4:
        raise ValueError(f"curvature step must be in (0, {(max_sigma - min_sigma) / 4}], got {step!r}")
    sigma = torch.as_tensor(sigma)
    sigma = sigma.to(torch.float32) if not sigma.is_floating_point() else sigma
    sigma = sigma.clamp(min_sigma, max_sigma)
    below, above = sigma - step, sigma + step
    near_noise = above > max_sigma
    near_data = below < min_sigma
    first = torch.where(near_noise, sigma - step, torch.where(near_data, sigma + step, below))
    second = torch.where(near_noise, sigma - 2 * step, torch.where(near_data, sigma + 2 * step, above))
    return first, second


def curvature_penalty(
    v_center: torch.Tensor,
    sigma_center,
    v_first: torch.Tensor,
    sigma_first,
    v_second: torch.Tensor,
    sigma_second,
    *,
    step: float,
    detach_neighbours: bool = True,
) -> torch.Tensor:
    """Per-sample curvature penalty mean((step^2 * d^2x/dsigma^2)^2), shape [B]; see the module doc.

    ``v_*`` are the model's velocities (v = eps - x0, ComfyUI sigma 1 = noise) at the three sigmas
    (numbers or [B] tensors, pairwise distinct per sample). The neighbour velocities are detached
    unless ``detach_neighbours`` is False.
    """
    check_same_shape(v_center=v_center, v_first=v_first, v_second=v_second)
    if not float(step) > 0:
        raise ValueError(f"curvature step must be > 0, got {step!r}")
    batch = v_center.shape[0]
    s0 = per_sample_sigma(sigma_center, batch, like=v_center)
    s1 = per_sample_sigma(sigma_first, batch, like=v_center)
    s2 = per_sample_sigma(sigma_second, batch, like=v_center)
    gaps = torch.stack([s0 - s1, s0 - s2, s1 - s2]).abs()
    if (gaps < 1e-6).any():
        raise ValueError("curvature needs three distinct sigmas per sample; use curvature_neighbour_sigmas()")
    if detach_neighbours:
        v_first, v_second = v_first.detach(), v_second.detach()
    dtype = v_center.dtype if v_center.dtype == torch.float64 else torch.float32
    v0, v1, v2 = (v.to(dtype) for v in (v_center, v_first, v_second))

    def coefficient(a, b, c):
        return expand_per_sample(2 * step**2 / ((a - b) * (a - c)), v0)

    scaled_second_derivative = (
        coefficient(s0, s1, s2) * v0 + coefficient(s1, s0, s2) * v1 + coefficient(s2, s0, s1) * v2
    )
    return per_sample_mean(scaled_second_derivative.square())
