"""Hybrid flow loss and the flow_loss entry point: hand-computed values, per-sample independence, errors."""

import pytest
import torch

from lumina_turbo.losses import LOSS_MODES, flow_loss, loss_mode_defaults, reduce_loss, resolve_loss_params
from lumina_turbo.losses.flow import hybrid_flow_loss
from lumina_turbo.samplers.flow import denoised_from_velocity, noisy_latent, velocity_target

MODES = sorted(LOSS_MODES)


def _batch(seed=0, shape=(3, 4, 16, 16)):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=generator, dtype=torch.float64)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    sigma = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)[: shape[0]]
    x_sigma = noisy_latent(x0, noise, sigma)
    target_v = velocity_target(x0, noise)
    pred_v = target_v + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    return pred_v, target_v, x_sigma, sigma


def test_convention_denoised_is_x_minus_sigma_v():
    pred_v, target_v, x_sigma, sigma = _batch()
    x0 = x_sigma - sigma.reshape(-1, 1, 1, 1) * target_v
    noise = x0 + target_v
    torch.testing.assert_close(
        x_sigma, (1 - sigma.reshape(-1, 1, 1, 1)) * x0 + sigma.reshape(-1, 1, 1, 1) * noise
    )
    torch.testing.assert_close(denoised_from_velocity(x_sigma, target_v, sigma), x0)


def test_hybrid_terms_by_hand():
    pred = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 1.0]])
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # sample 0: errors (0, 2, 2): MSE 8/3, L1 4/3, cos = 1 / 3 ; sample 1: errors (0,-1,1): MSE 2/3, L1 2/3, cos 0
    loss = hybrid_flow_loss(pred, target, lambda_mse=1.0, lambda_l1=0.5, lambda_cos=2.0)
    expected = torch.tensor([8 / 3 + 0.5 * 4 / 3 + 2.0 * (1 - 1 / 3), 2 / 3 + 0.5 * 2 / 3 + 2.0 * 1.0])
    torch.testing.assert_close(loss, expected)


def test_cosine_term_is_zero_for_parallel_vectors():
    target = torch.randn(2, 4, 8, 8)
    loss = hybrid_flow_loss(3.5 * target, target, lambda_mse=0.0, lambda_cos=1.0)
    torch.testing.assert_close(loss, torch.zeros(2), atol=1e-6, rtol=0)
    opposite = hybrid_flow_loss(-target, target, lambda_mse=0.0, lambda_cos=1.0)
    torch.testing.assert_close(opposite, torch.full((2,), 2.0))


def test_standard_default_is_plain_mse():
    pred_v, target_v, x_sigma, sigma = _batch()
    expected = (pred_v - target_v).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(flow_loss(pred_v, target_v, x_sigma, sigma), expected)


def test_seed_defaults():
    assert loss_mode_defaults("frequency")["alpha_hf"] == 1.0
    assert loss_mode_defaults("frequency")["beta_lf"] == 0.2
    style = loss_mode_defaults("style")
    assert (style["lambda_struct"], style["lambda_light"], style["lambda_color"], style["lambda_tex"]) == (
        1.0,
        0.5,
        0.3,
        0.5,
    )
    assert set(loss_mode_defaults("unified")) == set(loss_mode_defaults("frequency")) | set(
        loss_mode_defaults("style")
    )


@pytest.mark.parametrize("mode", MODES)
def test_perfect_prediction_costs_nothing(mode):
    _, target_v, x_sigma, sigma = _batch()
    params = {"lambda_l1": 1.0, "lambda_fft": 1.0}
    loss = flow_loss(target_v.clone(), target_v, x_sigma, sigma, mode, params)
    # 1 - SSIM of identical images is 0 only up to rounding; cosine of identical vectors too.
    torch.testing.assert_close(loss, torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_per_sample_independence(mode):
    pred_v, target_v, x_sigma, sigma = _batch()
    params = {"lambda_l1": 0.5, "lambda_cos": 0.1, "lambda_fft": 0.2}
    before = flow_loss(pred_v, target_v, x_sigma, sigma, mode, params)
    changed = pred_v.clone()
    changed[1] = changed[1] * -2 + 5
    changed_target = target_v.clone()
    changed_target[2] += 1
    after = flow_loss(changed, changed_target, x_sigma, sigma, mode, params)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    assert not torch.isclose(after[1], before[1])


@pytest.mark.parametrize("mode", MODES)
def test_gradient_reaches_only_own_sample(mode):
    pred_v, target_v, x_sigma, sigma = _batch()
    pred_v = pred_v.clone().requires_grad_(True)
    flow_loss(pred_v, target_v, x_sigma, sigma, mode)[0].backward()
    assert pred_v.grad[0].abs().sum() > 0
    assert pred_v.grad[1:].abs().sum() == 0


def test_low_precision_inputs_are_computed_in_float32():
    pred_v, target_v, x_sigma, sigma = (t.float() for t in _batch())
    loss = flow_loss(pred_v.bfloat16(), target_v.bfloat16(), x_sigma.bfloat16(), sigma, "unified")
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


def test_unknown_parameters_are_named():
    pred_v, target_v, x_sigma, sigma = _batch()
    with pytest.raises(ValueError, match=r"alpha_hf.*accepted"):
        flow_loss(pred_v, target_v, x_sigma, sigma, "standard", {"alpha_hf": 1.0})
    with pytest.raises(ValueError, match=r"\['lamda_tex', 'zzz'\]"):
        resolve_loss_params("style", {"lamda_tex": 1.0, "zzz": 2})


@pytest.mark.parametrize(
    "params",
    [{"lambda_l1": -1.0}, {"lambda_cos": float("nan")}, {"lambda_mse": True}, {"lambda_l1": "1"}],
)
def test_bad_weights_raise(params):
    with pytest.raises(ValueError, match=next(iter(params))):
        resolve_loss_params("standard", params)


def test_bad_mode_shape_and_sigma_raise():
    pred_v, target_v, x_sigma, sigma = _batch()
    with pytest.raises(ValueError, match="loss mode must be one of"):
        flow_loss(pred_v, target_v, x_sigma, sigma, "fancy")
    with pytest.raises(ValueError, match="downsample_factor"):
        flow_loss(pred_v, target_v, x_sigma, sigma, "frequency", {"downsample_factor": 2.5})
    with pytest.raises(ValueError, match="same shape"):
        flow_loss(pred_v, target_v[:, :2], x_sigma, sigma)
    with pytest.raises(ValueError, match="sigma must lie in"):
        flow_loss(pred_v, target_v, x_sigma, torch.tensor([0.5, 1.5, 0.1]))
    with pytest.raises(ValueError, match="one value per sample"):
        flow_loss(pred_v, target_v, x_sigma, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        flow_loss(pred_v.flatten(2), target_v.flatten(2), x_sigma.flatten(2), sigma, "frequency")
    # the standard mode works on any layout (e.g. video or token latents)
    assert flow_loss(pred_v.flatten(2), target_v.flatten(2), x_sigma.flatten(2), sigma).shape == (3,)


def test_reduce_loss_weights_each_sample():
    losses = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(reduce_loss(losses), torch.tensor(7 / 3))
    torch.testing.assert_close(reduce_loss(losses, torch.tensor([1.0, 0.5, 0.0])), torch.tensor(2 / 3))
    with pytest.raises(ValueError, match="weights must have shape"):
        reduce_loss(losses, torch.ones(2))


def test_all_weights_zero_is_rejected():
    with pytest.raises(ValueError, match="every loss weight"):
        resolve_loss_params("standard", {"lambda_mse": 0.0})
    with pytest.raises(ValueError, match="every loss weight"):
        resolve_loss_params("frequency", {"lambda_mse": 0.0, "alpha_hf": 0.0, "beta_lf": 0.0})
    assert resolve_loss_params("style", {"lambda_mse": 0.0})["lambda_struct"] == 1.0
