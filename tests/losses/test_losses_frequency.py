"""Band split, frequency band loss and FFT high-pass loss against direct references."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lumina_turbo.losses import flow_loss
from lumina_turbo.losses.frequency import (
    fft_highpass_loss,
    frequency_band_loss,
    highpass_frequency_mask,
    split_frequency_bands,
)


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 4, 13, 22)])
def test_split_reconstructs_input(shape):
    latent = torch.randn(shape, dtype=torch.float64)
    low, high = split_frequency_bands(latent, 4)
    torch.testing.assert_close(low + high, latent, rtol=0, atol=1e-12)


def test_constant_is_all_low_and_checkerboard_all_high():
    constant = torch.full((1, 2, 8, 8), 3.0)
    low, high = split_frequency_bands(constant, 4)
    torch.testing.assert_close(low, constant)
    torch.testing.assert_close(high, torch.zeros_like(constant))
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    checker = ((rows + cols) % 2 * 2 - 1).float().reshape(1, 1, 8, 8)
    low, high = split_frequency_bands(checker, 2)
    torch.testing.assert_close(low, torch.zeros_like(checker))
    torch.testing.assert_close(high, checker)


def test_low_band_is_block_mean_upsampled():
    latent = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    low, _ = split_frequency_bands(latent, 4)
    blocks = latent.reshape(2, 3, 4, 4, 6, 4).mean(dim=(3, 5))  # 4x4 block means, no pooling op
    reference = F.interpolate(blocks, size=(16, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(low, reference)


def test_band_loss_by_hand():
    target = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    detail = torch.zeros_like(target)
    detail[..., ::2, :] = 0.5  # rows alternate 0.5 / 0: mean 0.25 is all low band, +-0.25 all high band
    pred = target + detail
    low_t, _ = split_frequency_bands(target, 2)
    low_p = low_t + 0.25
    cos = F.cosine_similarity(low_p.flatten(1), low_t.flatten(1), dim=1)
    expected = 1.0 * 0.25 + 0.2 * (1 - cos)
    torch.testing.assert_close(frequency_band_loss(pred, target, downsample_factor=2), expected)


def test_frequency_mode_works_on_denoised_latents():
    generator = torch.Generator().manual_seed(1)
    shape = (2, 4, 16, 16)
    target_v, x_sigma, delta = (
        torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3)
    )
    sigma = torch.tensor([0.8, 0.3], dtype=torch.float64)
    pred_v = target_v + delta
    s = sigma.reshape(-1, 1, 1, 1)
    pred_x0, target_x0 = x_sigma - s * pred_v, x_sigma - s * target_v
    low_p, high_p = split_frequency_bands(pred_x0)
    low_t, high_t = split_frequency_bands(target_x0)
    cos = F.cosine_similarity(low_p.flatten(1), low_t.flatten(1), dim=1)
    expected = (
        delta.square().mean(dim=(1, 2, 3))
        + 1.5 * (high_p - high_t).abs().mean(dim=(1, 2, 3))
        + 0.4 * (1 - cos)
    )
    loss = flow_loss(pred_v, target_v, x_sigma, sigma, "frequency", {"alpha_hf": 1.5, "beta_lf": 0.4})
    torch.testing.assert_close(loss, expected)
    # an x0 error is sigma times the velocity error, so the linear high-band term scales with sigma
    _, high_delta = split_frequency_bands(delta)
    torch.testing.assert_close(
        (high_p - high_t).abs().mean(dim=(1, 2, 3)), sigma * high_delta.abs().mean(dim=(1, 2, 3))
    )


def test_highpass_mask_against_numpy():
    mask = highpass_frequency_mask(6, 8, dtype=torch.float64).numpy()
    fy, fx = np.fft.fftfreq(6), np.fft.fftfreq(8)
    radius = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / np.sqrt(0.5)
    np.testing.assert_allclose(mask, 1 / (1 + np.exp(-12 * (radius - 0.25))))
    assert mask[0, 0] < 0.05 and mask[3, 4] > 0.99  # DC kept out, Nyquist corner in


def test_fft_loss_against_numpy():
    generator = torch.Generator().manual_seed(2)
    pred, target = (torch.randn(2, 3, 6, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    mask = highpass_frequency_mask(6, 8, dtype=torch.float64).numpy()
    amp_p = np.log1p(np.abs(np.fft.fft2(pred.numpy(), norm="ortho")))
    amp_t = np.log1p(np.abs(np.fft.fft2(target.numpy(), norm="ortho")))
    expected = (np.abs(amp_p - amp_t) * mask).sum(axis=(1, 2, 3)) / (3 * mask.sum())
    np.testing.assert_allclose(fft_highpass_loss(pred, target).numpy(), expected)


def test_fft_loss_is_phase_blind():
    target = torch.randn(1, 2, 8, 8)
    shifted = torch.roll(target, shifts=(3, 2), dims=(2, 3))  # circular shift changes phase only
    torch.testing.assert_close(fft_highpass_loss(shifted, target), torch.zeros(1), atol=1e-5, rtol=0)
    assert fft_highpass_loss(target + torch.randn_like(target), target) > 0.05


def test_band_inputs_must_be_images():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        split_frequency_bands(torch.randn(2, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="downsample_factor"):
        split_frequency_bands(torch.randn(2, 3, 4, 4), 1)
