"""Structural similarity (SSIM), per sample, differentiable: kornia's SSIM (an 11 x 11 Gaussian window,
sigma 1.5, k1 0.01, k2 0.03) with "valid" borders, averaged per sample.

"Valid" convolution (no padding, as in the SSIM paper's reference code) keeps borders unbiased by
padding. Time-convention free: it compares two images (here: denoised latents x0, ComfyUI sigma
1 = noise).
"""

from __future__ import annotations

import torch
from kornia.metrics import ssim


def ssim_per_sample(
    pred: torch.Tensor, target: torch.Tensor, *, data_range: float = 1.0, window_size: int = 11
) -> torch.Tensor:
    """Mean SSIM of each sample over its channels and valid positions: [B, C, H, W] -> [B].

    When H or W is smaller than ``window_size`` the window shrinks to the largest odd size that fits,
    so tiny latents still get a structural score instead of an error.
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(
            f"SSIM needs two [B, C, H, W] tensors of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if data_range <= 0:
        raise ValueError(f"SSIM data_range must be > 0, got {data_range}")
    size = min(window_size, pred.shape[-2], pred.shape[-1])
    size = size if size % 2 == 1 else size - 1
    # eps 0: the SSIM constants already keep the denominator positive.
    return ssim(pred, target, size, max_val=data_range, eps=0.0, padding="valid").flatten(1).mean(dim=1)
