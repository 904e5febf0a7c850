"""Structural similarity (SSIM), per sample, differentiable.

Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error visibility to structural
similarity", IEEE TIP 2004:

    SSIM(x, y) = ((2 mu_x mu_y + C1)(2 s_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))
    C1 = (k1 L)^2, C2 = (k2 L)^2, k1 = 0.01, k2 = 0.03, L = data range

with local moments from an 11 x 11 Gaussian window (sigma 1.5), s^2 = E[x^2] - mu^2, and the map
averaged. "Valid" convolution (no padding, as in the paper's reference code), so borders are not
biased by padding. Time-convention free: it compares two images (here: denoised latents x0, ComfyUI
sigma 1 = noise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import per_sample_mean


def gaussian_window_1d(
    size: int = 11, sigma: float = 1.5, *, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Normalised sampled Gaussian of odd ``size`` taps, centred on the middle tap."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"SSIM window size must be a positive odd integer, got {size}")
    offsets = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    window = torch.exp(-offsets.square() / (2 * sigma**2))
    return window / window.sum()


def _blur_valid(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    # Separable depthwise Gaussian, no padding: output shrinks by size - 1 in H and W.
    channels = images.shape[1]
    size = window.shape[0]
    horizontal = window.reshape(1, 1, 1, size).expand(channels, 1, 1, size)
    vertical = window.reshape(1, 1, size, 1).expand(channels, 1, size, 1)
    return F.conv2d(F.conv2d(images, horizontal, groups=channels), vertical, groups=channels)


def ssim_per_sample(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    data_range: float = 1.0,
    window_size: int = 11,
    window_sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Mean SSIM of each sample over its channels and valid positions: [B, C, H, W] -> [B].

    When H or W is smaller than ``window_size`` the window shrinks to the largest odd size that fits
    (sigma unchanged), so tiny latents still get a structural score instead of an error.
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(
            f"SSIM needs two [B, C, H, W] tensors of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if data_range <= 0:
        raise ValueError(f"SSIM data_range must be > 0, got {data_range}")
    size = min(window_size, pred.shape[-2], pred.shape[-1])
    size = size if size % 2 == 1 else size - 1
    window = gaussian_window_1d(size, window_sigma, device=pred.device, dtype=pred.dtype)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2

    mu_pred = _blur_valid(pred, window)
    mu_target = _blur_valid(target, window)
    var_pred = _blur_valid(pred * pred, window) - mu_pred.square()
    var_target = _blur_valid(target * target, window) - mu_target.square()
    covariance = _blur_valid(pred * target, window) - mu_pred * mu_target

    numerator = (2 * mu_pred * mu_target + c1) * (2 * covariance + c2)
    denominator = (mu_pred.square() + mu_target.square() + c1) * (var_pred + var_target + c2)
    return per_sample_mean(numerator / denominator)
