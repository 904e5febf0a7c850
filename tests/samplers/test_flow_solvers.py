"""Flow midpoint sampler on the exact Gaussian-mixture flow: order, NFE, callback; the benchmark library."""

import pytest
import torch

from lumina_turbo.benchmarks.exact_flow import (
    evaluate_sampler,
    make_denoiser,
    make_mixture,
    reference_solution,
    sliced_wasserstein,
    terminal_error,
)
from lumina_turbo.samplers.flow_solvers import count_model_calls, sample_flow_midpoint
from lumina_turbo.samplers.schedules import anchor_sigmas


@pytest.fixture(scope="module")
def smooth_flow():
    # Broad components keep the flow smooth, so 16-64 steps are in the asymptotic regime
    # (error ratios 3.5, 3.7 with the midpoint final step; 4.2, 4.1 with the Euler one).
    mixture = make_mixture(dim=4, components=3, std_range=(0.3, 0.5), seed=3)
    noise = torch.randn(64, mixture.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return mixture, noise, reference_solution(mixture, noise)


def _uniform(steps):
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


@pytest.mark.parametrize("final_step", ["midpoint", "euler"])
def test_midpoint_is_second_order_on_the_exact_flow(smooth_flow, final_step):
    mixture, noise, reference = smooth_flow
    model = make_denoiser(mixture)
    errors = []
    for steps in (16, 32, 64):
        x = sample_flow_midpoint(model, noise.clone(), _uniform(steps), disable=True, final_step=final_step)
        errors.append(terminal_error(x, reference))
    assert errors[0] / errors[1] > 3 and errors[1] / errors[2] > 3, errors


def test_midpoint_beats_euler_final_step_at_fewer_calls(smooth_flow):
    mixture, noise, reference = smooth_flow
    model = make_denoiser(mixture)
    full = sample_flow_midpoint(model, noise.clone(), _uniform(6), disable=True)  # 12 calls
    cheap = sample_flow_midpoint(model, noise.clone(), _uniform(7), disable=True, final_step="euler")  # 13
    assert terminal_error(full, reference) < terminal_error(cheap, reference)


@pytest.mark.parametrize("steps", [1, 2, 8])
def test_model_calls_per_interval_and_never_at_sigma_zero(steps):
    seen = []

    def model(x, sigma, **extra_args):
        seen.append(sigma.clone())
        return torch.zeros_like(x)

    x = torch.randn(2, 3)
    sigmas = anchor_sigmas(steps, 3.0)
    counted = count_model_calls(model)
    sample_flow_midpoint(counted, x, sigmas, disable=True)
    assert counted.calls == 2 * steps
    counted = count_model_calls(model)
    sample_flow_midpoint(counted, x, sigmas, disable=True, final_step="euler")
    assert counted.calls == 2 * steps - 1  # the Euler final step saves its second call
    # A schedule that stops above 0 (e.g. the first half of a split) has no final saving.
    counted = count_model_calls(model)
    sample_flow_midpoint(counted, x, torch.tensor([1.0, 0.6, 0.3]), disable=True, final_step="euler")
    assert counted.calls == 4
    assert all(bool((sigma > 0).all()) for sigma in seen)
    assert all(sigma.shape == (2,) for sigma in seen)  # per-sample sigma, k-diffusion style


def test_callback_once_per_step_with_k_diffusion_keys():
    calls = []
    sigmas = anchor_sigmas(5, 3.0)
    x = torch.randn(2, 3)

    def model(x, sigma, **extra_args):
        assert extra_args == {"cond": "kept"}
        return 0.5 * x

    sample_flow_midpoint(model, x, sigmas, extra_args={"cond": "kept"}, callback=calls.append, disable=True)
    assert [c["i"] for c in calls] == list(range(5))
    assert all(set(c) == {"x", "i", "sigma", "sigma_hat", "denoised"} for c in calls)
    assert [float(c["sigma"]) for c in calls] == sigmas[:-1].tolist()
    assert torch.equal(calls[0]["x"], x) and torch.equal(calls[0]["denoised"], 0.5 * x)


def test_straight_flow_is_integrated_exactly():
    # A single data point makes every trajectory a straight line: the midpoint rule is exact.
    target = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)

    def model(x, sigma, **extra_args):
        return target.expand_as(x)

    noise = torch.randn(4, 3, dtype=torch.float64)
    for final_step in ("midpoint", "euler"):
        x = sample_flow_midpoint(
            model, noise, anchor_sigmas(3, 3.0).double(), disable=True, final_step=final_step
        )
        torch.testing.assert_close(x, target.expand_as(x))


def test_unknown_final_step_is_rejected():
    with pytest.raises(ValueError, match="final_step"):
        sample_flow_midpoint(lambda x, s: x, torch.zeros(1, 2), torch.tensor([1.0, 0.0]), final_step="rk4")


def test_exact_flow_velocity_matches_denoiser_and_reference_is_tight(smooth_flow):
    mixture, noise, reference = smooth_flow
    x = noise[:8]
    for sigma in (0.9, 0.4, 0.05):
        torch.testing.assert_close(mixture.velocity(x, sigma), (x - mixture.denoise(x, sigma)) / sigma)
    looser = reference_solution(mixture, noise, tolerance=1e-8)
    assert terminal_error(reference, looser) < 1e-6


def test_evaluate_sampler_reports_nfe_and_distances(smooth_flow):
    mixture, noise, reference = smooth_flow
    data = mixture.sample(noise.shape[0], torch.Generator().manual_seed(1))
    result = evaluate_sampler(sample_flow_midpoint, mixture, _uniform(8), noise, reference, data)
    assert result["nfe"] == 16
    assert 0 < result["terminal_error"] < 0.05
    assert result["sliced_wasserstein"] > 0
    assert sliced_wasserstein(reference, reference) == 0.0
