"""SSIM against kornia and by hand; Lab-like channel split; style loss terms."""

import kornia
import pytest
import torch

from lumina_turbo.losses import flow_loss
from lumina_turbo.losses.frequency import split_frequency_bands
from lumina_turbo.losses.ssim import ssim_per_sample
from lumina_turbo.losses.style import luminance_and_colour, moment_distance, style_structure_loss


@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_ssim_is_the_papers_formula_with_a_gaussian_window(data_range):
    # 11 x 11 images: one valid window position, so the Gaussian-weighted moments are computed directly
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(3, 2, 11, 11, generator=generator, dtype=torch.float64) * data_range
    target = 0.6 * pred + 0.4 * data_range * torch.rand(
        3, 2, 11, 11, generator=generator, dtype=torch.float64
    )
    taps = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    weights = torch.outer(taps, taps) / taps.sum() ** 2

    def moment(values):
        return (values * weights).sum(dim=(-2, -1))

    mu_x, mu_y = moment(pred), moment(target)
    var_x, var_y = moment(pred * pred) - mu_x**2, moment(target * target) - mu_y**2
    cov = moment(pred * target) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    expected = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    torch.testing.assert_close(ssim_per_sample(pred, target, data_range=data_range), expected.mean(dim=1))


def test_ssim_of_flat_images_by_hand():
    # flat images: all variances are 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) exactly
    a, b, c1 = 0.2, 0.7, 0.01**2
    pred, target = (
        torch.full((1, 1, 16, 16), a, dtype=torch.float64),
        torch.full((1, 1, 16, 16), b, dtype=torch.float64),
    )
    torch.testing.assert_close(
        ssim_per_sample(pred, target),
        torch.tensor([(2 * a * b + c1) / (a * a + b * b + c1)], dtype=torch.float64),
    )


def test_ssim_identity_and_anticorrelation():
    image = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(ssim_per_sample(image, image), torch.ones(2, dtype=torch.float64))
    assert (ssim_per_sample(image, 1 - image) < 0).all()


def test_small_images_shrink_the_window():
    tiny = torch.rand(1, 1, 6, 9)  # smaller than the 11 window: shrinks to 5
    reference = kornia.metrics.ssim(tiny, tiny * 0.5, 5, eps=0.0, padding="valid").mean()
    torch.testing.assert_close(ssim_per_sample(tiny, tiny * 0.5)[0], reference)


def test_default_channels_follow_acrf_convention():
    latent = torch.arange(2 * 16 * 2 * 2, dtype=torch.float32).reshape(2, 16, 2, 2)
    luma, colour = luminance_and_colour(latent)
    torch.testing.assert_close(luma, latent[:, :1])
    torch.testing.assert_close(colour, latent[:, 1:4])


def test_rgb_projection_gives_bt601_ycbcr():
    factors = torch.zeros(4, 3)
    factors[0, 0] = factors[1, 1] = factors[2, 2] = 1.0  # channels 0-2 are R, G, B; channel 3 unused
    latent = torch.zeros(1, 4, 1, 3)
    latent[0, 0, 0, 0] = 1.0  # pure red
    latent[0, :3, 0, 1] = 1.0  # white
    latent[0, 3, 0, 2] = 5.0  # invisible channel: black
    luma, colour = luminance_and_colour(latent, factors, torch.tensor([0.0, 0.0, 0.0]))
    torch.testing.assert_close(luma.flatten(), torch.tensor([0.299, 1.0, 0.0]))
    # red: Cb = 0.5 (0 - 0.299)/0.886, Cr = 0.5 (1 - 0.299)/0.701 = 0.5; white and black have no chroma
    torch.testing.assert_close(colour[0, :, 0, 0], torch.tensor([-0.5 * 0.299 / 0.886, 0.5]))
    torch.testing.assert_close(colour[0, :, 0, 1:], torch.zeros(2, 2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"\[C, 3\] = \[4, 3\]"):
        luminance_and_colour(latent, torch.zeros(3, 3))


def test_moment_distance_by_hand():
    pred = torch.tensor([[[[0.0, 2.0], [0.0, 2.0]]]])  # mean 1, std 1
    target = torch.tensor([[[[1.0, 1.0], [2.0, 2.0]]]]) * 2  # mean 3, std 1
    torch.testing.assert_close(moment_distance(pred, target), torch.tensor([2.0]), atol=1e-7, rtol=0)
    flat = torch.zeros(1, 1, 2, 2, requires_grad=True)
    moment_distance(flat, target).sum().backward()
    assert torch.isfinite(flat.grad).all()


def test_style_loss_combines_its_terms():
    generator = torch.Generator().manual_seed(3)
    target = torch.randn(2, 4, 16, 16, generator=generator, dtype=torch.float64)
    pred = target + 0.5 * torch.randn(2, 4, 16, 16, generator=generator, dtype=torch.float64)
    weights = {"lambda_struct": 1.3, "lambda_light": 0.7, "lambda_color": 0.2, "lambda_tex": 0.9}
    _, high_p = split_frequency_bands(pred[:, :1])
    _, high_t = split_frequency_bands(target[:, :1])
    expected = (
        1.3 * (1 - ssim_per_sample(pred[:, :1], target[:, :1]))
        + 0.7 * moment_distance(pred[:, :1], target[:, :1])
        + 0.2 * moment_distance(pred[:, 1:4], target[:, 1:4])
        + 0.9 * (high_p - high_t).abs().mean(dim=(1, 2, 3))
    )
    torch.testing.assert_close(style_structure_loss(pred, target, **weights), expected)


def test_style_mode_uses_denoised_latents_and_factors():
    generator = torch.Generator().manual_seed(4)
    target_v, x_sigma, delta = (
        torch.randn(2, 4, 12, 12, generator=generator, dtype=torch.float64) for _ in range(3)
    )
    sigma = torch.tensor([0.7, 0.4], dtype=torch.float64)
    factors = torch.randn(4, 3, generator=generator, dtype=torch.float64) * 0.3
    s = sigma.reshape(-1, 1, 1, 1)
    pred_v = target_v + delta
    expected = delta.square().mean(dim=(1, 2, 3)) + 0.5 * style_structure_loss(
        x_sigma - s * pred_v, x_sigma - s * target_v, latent_rgb_factors=factors
    )
    loss = flow_loss(
        pred_v, target_v, x_sigma, sigma, "style", {"lambda_style": 0.5}, latent_rgb_factors=factors
    )
    torch.testing.assert_close(loss, expected)
    unified = flow_loss(
        pred_v,
        target_v,
        x_sigma,
        sigma,
        "unified",
        {"lambda_freq": 0.0, "lambda_style": 0.5},
        latent_rgb_factors=factors,
    )
    torch.testing.assert_close(unified, expected)
