"""Curvature penalty: exact on quadratic trajectories, AC-RF's centred form, neighbour placement."""

import pytest
import torch

from lumina_turbo.losses import curvature_neighbour_sigmas, curvature_penalty, default_curvature_step

F64 = torch.float64


def _quadratic_velocity(a, b, c, sigma):
    s = torch.as_tensor(sigma, dtype=F64).reshape(-1, 1, 1, 1)
    return a + b * s + c * s * s  # d v / d sigma = b + 2 c sigma, second derivative of x is that; of v: 2c


@pytest.mark.parametrize("sigma", [[0.5, 0.3], [0.995, 0.002]])  # centred, then one-sided at both ends
def test_exact_for_quadratic_velocity(sigma):
    generator = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2, 3, 4, 4, generator=generator, dtype=F64) for _ in range(3))
    step = 0.05
    sigma = torch.tensor(sigma, dtype=F64)
    first, second = curvature_neighbour_sigmas(sigma, step)
    penalty = curvature_penalty(
        _quadratic_velocity(a, b, c, sigma), sigma,
        _quadratic_velocity(a, b, c, first), first,
        _quadratic_velocity(a, b, c, second), second,
        step=step,
    )  # fmt: skip
    # dv/dsigma of a quadratic v is b + 2 c sigma; the finite difference of v estimates dv/dsigma's slope, 2c
    expected = (step**2 * 2 * c).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(penalty, expected)


def test_straight_trajectory_has_no_curvature():
    v = torch.randn(2, 4, 8, 8, dtype=F64)
    sigma = torch.tensor([0.4, 0.7], dtype=F64)
    first, second = curvature_neighbour_sigmas(sigma, 0.1)
    penalty = curvature_penalty(v, sigma, v.clone(), first, v.clone(), second, step=0.1)
    torch.testing.assert_close(penalty, torch.zeros(2, dtype=F64))


def test_centred_stencil_equals_acrf_second_difference():
    generator = torch.Generator().manual_seed(1)
    v_minus, v_center, v_plus = (torch.randn(2, 4, 8, 8, generator=generator, dtype=F64) for _ in range(3))
    sigma, step = torch.tensor([0.5, 0.6], dtype=F64), 0.1
    penalty = curvature_penalty(v_center, sigma, v_minus, sigma - step, v_plus, sigma + step, step=step)
    torch.testing.assert_close(penalty, (v_plus - 2 * v_center + v_minus).square().mean(dim=(1, 2, 3)))


def test_neighbour_sigmas_keep_the_step():
    sigma = torch.tensor([0.5, 0.98, 0.999, 0.01, 0.001])
    first, second = curvature_neighbour_sigmas(sigma, 0.05)
    torch.testing.assert_close(first, torch.tensor([0.45, 0.93, 0.949, 0.06, 0.051]))
    torch.testing.assert_close(second, torch.tensor([0.55, 0.88, 0.899, 0.11, 0.101]))
    assert (first >= 0.001).all() and (second <= 0.999).all()


def test_gradient_only_through_the_centre_prediction():
    v_center = torch.randn(2, 3, 4, 4, requires_grad=True)
    v_first = torch.randn(2, 3, 4, 4, requires_grad=True)
    v_second = torch.randn(2, 3, 4, 4, requires_grad=True)
    curvature_penalty(v_center, 0.5, v_first, 0.4, v_second, 0.6, step=0.1).sum().backward()
    assert v_center.grad.abs().sum() > 0
    assert v_first.grad is None and v_second.grad is None
    v_first.grad = None
    curvature_penalty(
        v_center, 0.5, v_first, 0.4, v_second, 0.6, step=0.1, detach_neighbours=False
    ).sum().backward()
    assert v_first.grad.abs().sum() > 0


def test_per_sample_independence():
    v = [torch.randn(3, 2, 4, 4) for _ in range(3)]
    before = curvature_penalty(v[0], 0.5, v[1], 0.4, v[2], 0.6, step=0.1)
    v[1] = v[1].clone()
    v[1][2] += 3
    after = curvature_penalty(v[0], 0.5, v[1], 0.4, v[2], 0.6, step=0.1)
    torch.testing.assert_close(after[:2], before[:2], rtol=0, atol=0)
    assert after[2] != before[2]


def test_default_step_and_errors():
    assert default_curvature_step([1.0, 0.75, 0.5, 0.25]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="distinct"):
        curvature_penalty(torch.ones(1, 2), 0.5, torch.ones(1, 2), 0.5, torch.ones(1, 2), 0.6, step=0.1)
    with pytest.raises(ValueError, match="curvature step"):
        curvature_neighbour_sigmas(0.5, 0.3)
    with pytest.raises(ValueError, match="at least 2 anchors"):
        default_curvature_step([1.0])
