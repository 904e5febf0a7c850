"""Min-SNR-gamma weights: hand-computed values, the RF derivation, AC-RF's numbers, edge sigmas."""

import pytest
import torch

from lumina_turbo.losses import min_snr_weight, snr_from_sigma
from lumina_turbo.samplers.flow import denoised_from_velocity, noisy_latent, velocity_target

F64 = torch.float64


def test_snr_by_hand():
    sigma = torch.tensor([0.5, 0.2, 0.8, 1.0, 0.0], dtype=F64)
    torch.testing.assert_close(
        snr_from_sigma(sigma), torch.tensor([1.0, 16.0, 1 / 16, 0.0, float("inf")], dtype=F64)
    )


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        # sigma = 0.5 (SNR 1), 0.2 (SNR 16), 0.8 (SNR 1/16), gamma 5
        ("rectified_flow_velocity", [0.25 * 1, 0.04 * 5, 0.64 / 16]),
        ("vp_v_prediction", [1 / 2, 5 / 17, (1 / 16) / (17 / 16)]),
        ("epsilon", [1.0, 5 / 16, 1.0]),
        ("x0", [1.0, 5.0, 1 / 16]),
    ],
)
def test_weights_by_hand(form, expected):
    sigma = torch.tensor([0.5, 0.2, 0.8], dtype=F64)
    torch.testing.assert_close(min_snr_weight(sigma, 5.0, form=form), torch.tensor(expected, dtype=F64))


def test_rectified_flow_weight_closed_forms_agree():
    sigma = torch.linspace(0.01, 0.99, 99, dtype=F64)
    snr = snr_from_sigma(sigma)
    weight = min_snr_weight(sigma, 5.0)
    torch.testing.assert_close(weight, sigma**2 * torch.clamp(snr, max=5.0))
    torch.testing.assert_close(weight, torch.clamp(snr, max=5.0) / (1 + snr.sqrt()) ** 2)
    # peak at sigma = 1 / (1 + sqrt(gamma)) with value gamma / (1 + sqrt(gamma))^2
    peak_sigma = 1 / (1 + 5**0.5)
    assert abs(float(sigma[weight.argmax()]) - peak_sigma) < 0.01
    torch.testing.assert_close(
        min_snr_weight(torch.tensor(peak_sigma, dtype=F64)), torch.tensor(5 / (1 + 5**0.5) ** 2, dtype=F64)
    )


def test_rectified_flow_weight_turns_velocity_mse_into_min_snr_x0_mse():
    generator = torch.Generator().manual_seed(0)
    x0, noise, error = (torch.randn(4, 3, 8, 8, generator=generator, dtype=F64) for _ in range(3))
    sigma = torch.tensor([0.1, 0.3, 0.6, 0.95], dtype=F64)
    x_sigma = noisy_latent(x0, noise, sigma)
    target_v = velocity_target(x0, noise)
    pred_v = target_v + error
    v_mse = (pred_v - target_v).square().mean(dim=(1, 2, 3))
    x0_mse = (denoised_from_velocity(x_sigma, pred_v, sigma) - x0).square().mean(dim=(1, 2, 3))
    paper = (
        torch.clamp(snr_from_sigma(sigma), max=5.0) * x0_mse
    )  # Hang et al.: min(SNR, gamma) ||x0 error||^2
    torch.testing.assert_close(min_snr_weight(sigma, 5.0) * v_mse, paper)


def test_acrf_numbers_for_shift3_anchors():
    # research note 1.6: VP form at the S=3 diffusers anchors .96 / .79 / .278: .002 / .066 / .65
    sigma = torch.tensor([0.96, 0.79, 0.278], dtype=F64)
    weight = min_snr_weight(sigma, 5.0, form="vp_v_prediction")
    torch.testing.assert_close(weight, torch.tensor([0.0017, 0.066, 0.6456], dtype=F64), atol=6e-4, rtol=0)
    floored = min_snr_weight(sigma, 5.0, form="vp_v_prediction", floor=0.1)
    torch.testing.assert_close(floored, torch.tensor([0.1, 0.1, float(weight[2])], dtype=F64))


def test_endpoints_are_exact_and_finite():
    sigma = torch.tensor([0.0, 1.0], dtype=F64)
    expected = {
        "rectified_flow_velocity": [0.0, 0.0],
        "vp_v_prediction": [0.0, 0.0],
        "epsilon": [0.0, 1.0],
        "x0": [5.0, 0.0],
    }
    for form, values in expected.items():
        torch.testing.assert_close(
            min_snr_weight(sigma, 5.0, form=form), torch.tensor(values, dtype=F64), msg=form
        )


def test_bad_arguments():
    with pytest.raises(ValueError, match="form must be one of"):
        min_snr_weight(0.5, form="v")
    with pytest.raises(ValueError, match="snr_gamma"):
        min_snr_weight(0.5, 0.0)
    with pytest.raises(ValueError, match="sigma must lie in"):
        min_snr_weight(torch.tensor([1.2]))
    with pytest.raises(ValueError, match="floor"):
        min_snr_weight(0.5, floor=-1)
