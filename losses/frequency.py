"""Frequency-aware loss terms: a spatial low/high band split and an FFT high-pass amplitude loss.

Time convention: ComfyUI sigma (1 = noise, 0 = data); Lumina t = 1 - sigma; diffusers timestep =
1000 sigma. These terms compare *denoised latents* x0 = x_sigma - sigma v (see losses.common), not
velocities: "texture" and "structure" are properties of the image, while a velocity eps - x0 is
dominated by the noise at every sigma. An error in v reaches x0 scaled by sigma, so the linear terms
below equal sigma times the same term on velocities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import check_same_shape, cosine_distance, per_sample_mean


def _check_image_batch(**tensors: torch.Tensor) -> None:
    shape = check_same_shape(**tensors)
    if len(shape) != 4:
        names = ", ".join(tensors)
        raise ValueError(f"{names} must be image latents of shape [B, C, H, W], got {tuple(shape)}")


def check_downsample_factor(downsample_factor) -> int:
    """An integer >= 2: the low band keeps structures larger than about this many latent pixels."""
    if (
        isinstance(downsample_factor, bool)
        or not float(downsample_factor).is_integer()
        or downsample_factor < 2
    ):
        raise ValueError(f"downsample_factor must be an integer >= 2, got {downsample_factor!r}")
    return int(downsample_factor)


def split_frequency_bands(
    latent: torch.Tensor, downsample_factor: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split [B, C, H, W] latents into (low, high) with low + high == latent exactly.

        low  = upsample_bilinear(adaptive_avg_pool(latent, (H // f, W // f)), (H, W))
        high = latent - low

    (AC-RF ``frequency_aware_loss``: downsample then upsample; f = ``downsample_factor``, default 4;
    bilinear with align_corners=False.) Works on any latent, whatever its time convention.
    """
    _check_image_batch(latent=latent)
    factor = check_downsample_factor(downsample_factor)
    height, width = latent.shape[-2:]
    pooled = F.adaptive_avg_pool2d(latent, (max(1, height // factor), max(1, width // factor)))
    low = F.interpolate(pooled, size=(height, width), mode="bilinear", align_corners=False)
    return low, latent - low


def frequency_band_loss(
    pred_x0: torch.Tensor,
    target_x0: torch.Tensor,
    *,
    alpha_hf: float = 1.0,
    beta_lf: float = 0.2,
    downsample_factor: int = 4,
) -> torch.Tensor:
    """Per-sample band loss on denoised latents, shape [B]:

        alpha_hf * mean(|high(x̂0) - high(x0)|) + beta_lf * (1 - cos(low(x̂0), low(x0)))

    High band: texture and edges (L1 is robust and keeps sharp detail); low band: structure and
    lighting, constrained in direction only. Inputs are denoised latents x0 = x_sigma - sigma v
    (ComfyUI sigma, 1 = noise). Seed defaults alpha_hf = 1.0, beta_lf = 0.2, factor 4.
    """
    _check_image_batch(pred_x0=pred_x0, target_x0=target_x0)
    pred_low, pred_high = split_frequency_bands(pred_x0, downsample_factor)
    target_low, target_high = split_frequency_bands(target_x0, downsample_factor)
    loss = pred_x0.new_zeros(pred_x0.shape[0])
    if alpha_hf:
        loss = loss + alpha_hf * per_sample_mean((pred_high - target_high).abs())
    if beta_lf:
        loss = loss + beta_lf * cosine_distance(pred_low, target_low)
    return loss


def highpass_frequency_mask(height: int, width: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Soft radial high-pass mask [H, W] in torch.fft.fft2 order (no fftshift).

        r = |f| / |f_corner|, f in cycles per latent pixel, |f_corner| = sqrt(0.5^2 + 0.5^2)
        mask = sigmoid(12 * (r - 0.25))

    After AC-RF v1's FFT loss (``sigmoid((r / 0.707 - 0.25) * 12)``); the radius normalisation is
    defined here. Order does not matter for the masked mean, so no fftshift is needed.
    """
    fy = torch.fft.fftfreq(height, device=device, dtype=dtype)
    fx = torch.fft.fftfreq(width, device=device, dtype=dtype)
    radius = torch.sqrt(fy[:, None].square() + fx[None, :].square()) / math.sqrt(0.5)
    return torch.sigmoid(12 * (radius - 0.25))


def fft_highpass_loss(pred_x0: torch.Tensor, target_x0: torch.Tensor) -> torch.Tensor:
    """Per-sample FFT amplitude loss on denoised latents (AC-RF v1, ``lambda_fft``), shape [B]:

        A(x) = log(1 + |FFT2_ortho(x)|) per channel,  m = highpass_frequency_mask(H, W)
        L_b  = sum_{c,u,w} m_uw |A(x̂0) - A(x0)|_cuw / (C * sum_uw m_uw)

    Compares amplitude spectra only (phase-blind), weighted toward high spatial frequencies.
    Inputs are denoised latents x0 = x_sigma - sigma v (ComfyUI sigma, 1 = noise).
    """
    _check_image_batch(pred_x0=pred_x0, target_x0=target_x0)
    height, width = pred_x0.shape[-2:]
    mask = highpass_frequency_mask(height, width, device=pred_x0.device, dtype=pred_x0.dtype)
    pred_amplitude = torch.log1p(torch.fft.fft2(pred_x0, norm="ortho").abs())
    target_amplitude = torch.log1p(torch.fft.fft2(target_x0, norm="ortho").abs())
    weighted = (pred_amplitude - target_amplitude).abs() * mask
    channels = pred_x0.shape[1]
    return weighted.sum(dim=(1, 2, 3)) / (channels * mask.sum())
