"""Style-structure loss: the latent treated as a Lab-like image (luminance + two colour channels).

Time convention: ComfyUI sigma (1 = noise, 0 = data); Lumina t = 1 - sigma; diffusers timestep =
1000 sigma. The loss compares *denoised latents* x0 = x_sigma - sigma v, never velocities: SSIM,
lighting (mean/std) and colour statistics describe an image, while a velocity eps - x0 has the
noise's unit variance at every sigma, so its std says nothing about contrast.

Which channels are "luminance" and "colour" (the honest part):
  * With ``latent_rgb_factors`` (a [C, 3] matrix, the layout of ComfyUI's
    ``LatentFormat.latent_rgb_factors``, optional ``latent_rgb_bias`` [3]): the latent is projected
    linearly to approximate RGB, then split into BT.601 Y (luma) and Cb, Cr (opponent colour). This
    is the Lab-like reading with an actual basis: the same linear preview ComfyUI uses. The factors
    must belong to the latent space the trainer works in (the model's ``process_in`` space).
  * Without it: AC-RF's original latent convention (commit 59eda25): channel 0 stands in for L and
    channels 1-3 for the colour channels. No VAE guarantees that channel 0 carries luminance; this is
    an arbitrary, documented convention kept so results are comparable with AC-RF.
"""

from __future__ import annotations

import torch

from .common import per_sample_mean
from .frequency import _check_image_batch, split_frequency_bands
from .ssim import ssim_per_sample

# BT.601 luma weights; Cb/Cr are (B - Y) and (R - Y) scaled to span [-0.5, 0.5] for RGB in [0, 1].
_LUMA = (0.299, 0.587, 0.114)


def luminance_and_colour(
    latent: torch.Tensor,
    latent_rgb_factors: torch.Tensor | None = None,
    latent_rgb_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split [B, C, H, W] latents into (luminance [B, 1, H, W], colour [B, K, H, W]); see the module doc.

    With factors: RGB = sum_c latent_c * F[c] + bias; Y = 0.299 R + 0.587 G + 0.114 B,
    Cb = 0.5 (B - Y) / 0.886, Cr = 0.5 (R - Y) / 0.701 (K = 2). Without: channel 0 and channels 1..3
    (K = min(C, 4) - 1, possibly 0). Works on latents of any time convention (here denoised x0).
    """
    _check_image_batch(latent=latent)
    if latent_rgb_factors is None:
        if latent_rgb_bias is not None:
            raise ValueError("latent_rgb_bias needs latent_rgb_factors")
        return latent[:, :1], latent[:, 1:4]
    factors = torch.as_tensor(latent_rgb_factors, device=latent.device, dtype=latent.dtype)
    if factors.shape != (latent.shape[1], 3):
        raise ValueError(
            f"latent_rgb_factors must have shape [C, 3] = [{latent.shape[1]}, 3], got {tuple(factors.shape)}"
        )
    rgb = torch.einsum("bchw,ck->bkhw", latent, factors)
    if latent_rgb_bias is not None:
        bias = torch.as_tensor(latent_rgb_bias, device=latent.device, dtype=latent.dtype)
        if bias.shape != (3,):
            raise ValueError(f"latent_rgb_bias must have shape [3], got {tuple(bias.shape)}")
        rgb = rgb + bias.reshape(1, 3, 1, 1)
    red, green, blue = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
    luma = _LUMA[0] * red + _LUMA[1] * green + _LUMA[2] * blue
    chroma_blue = 0.5 * (blue - luma) / (1 - _LUMA[2])
    chroma_red = 0.5 * (red - luma) / (1 - _LUMA[0])
    return luma, torch.cat([chroma_blue, chroma_red], dim=1)


def moment_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over channels of |mean(p) - mean(t)| + |std(p) - std(t)|, spatial moments.

    std is the population std sqrt(var + 1e-8): the small floor keeps the gradient finite on flat
    channels. [B, K, H, W] -> [B]; 0 when K = 0.
    """
    if pred.shape[1] == 0:
        return pred.new_zeros(pred.shape[0])
    pred_flat = pred.flatten(2)
    target_flat = target.flatten(2)
    mean_gap = (pred_flat.mean(dim=2) - target_flat.mean(dim=2)).abs()
    pred_std = torch.sqrt(pred_flat.var(dim=2, unbiased=False) + 1e-8)
    target_std = torch.sqrt(target_flat.var(dim=2, unbiased=False) + 1e-8)
    return (mean_gap + (pred_std - target_std).abs()).mean(dim=1)


def style_structure_loss(
    pred_x0: torch.Tensor,
    target_x0: torch.Tensor,
    *,
    lambda_struct: float = 1.0,
    lambda_light: float = 0.5,
    lambda_color: float = 0.3,
    lambda_tex: float = 0.5,
    downsample_factor: int = 4,
    ssim_data_range: float = 1.0,
    latent_rgb_factors: torch.Tensor | None = None,
    latent_rgb_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample style-structure loss on denoised latents x0 = x_sigma - sigma v, shape [B]:

        lambda_struct * (1 - SSIM(L̂, L))                       structure lock (keeps faces from collapsing)
      + lambda_light  * moment_distance(L̂, L)                   lighting curve (mean/std of luminance)
      + lambda_color  * moment_distance(ab̂, ab)                 colour grading (mean/std of colour)
      + lambda_tex    * mean|high(L̂) - high(L)|                 texture (high band, see frequency.py)

    L / ab as chosen by :func:`luminance_and_colour`. SSIM: 11x11 Gaussian window, sigma 1.5,
    C1 = (0.01 R)^2, C2 = (0.03 R)^2 with R = ``ssim_data_range``. Defaults are AC-RF's
    (struct 1.0, light 0.5, color 0.3, tex 0.5). Unlike AC-RF's latent class, which used a cosine
    proxy (59eda25) or moments only (HEAD), the structure term here is real SSIM.
    ComfyUI sigma convention (1 = noise).
    """
    _check_image_batch(pred_x0=pred_x0, target_x0=target_x0)
    pred_luma, pred_colour = luminance_and_colour(pred_x0, latent_rgb_factors, latent_rgb_bias)
    target_luma, target_colour = luminance_and_colour(target_x0, latent_rgb_factors, latent_rgb_bias)
    loss = pred_x0.new_zeros(pred_x0.shape[0])
    if lambda_struct:
        loss = loss + lambda_struct * (
            1 - ssim_per_sample(pred_luma, target_luma, data_range=ssim_data_range)
        )
    if lambda_light:
        loss = loss + lambda_light * moment_distance(pred_luma, target_luma)
    if lambda_color:
        loss = loss + lambda_color * moment_distance(pred_colour, target_colour)
    if lambda_tex:
        _, pred_high = split_frequency_bands(pred_luma, downsample_factor)
        _, target_high = split_frequency_bands(target_luma, downsample_factor)
        loss = loss + lambda_tex * per_sample_mean((pred_high - target_high).abs())
    return loss
