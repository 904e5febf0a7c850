"""Schedules: anchor sigmas against diffusers and official Z-Image, the sigmoid schedule, bad input."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from lumina_turbo.samplers.schedules import (
    anchor_sigmas,
    check_sigmas,
    sigmoid_sigmas,
    time_shift,
)


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 6.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 9, 25, 50])
def test_diffusers_convention_matches_flow_match_euler_scheduler(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    ours = anchor_sigmas(steps, shift, convention="diffusers")
    assert ours.dtype == torch.float32 and ours.shape == scheduler.sigmas.shape
    torch.testing.assert_close(ours, scheduler.sigmas.to(torch.float32), atol=1e-6, rtol=0)


def test_zimage_convention_matches_official_turbo_sigmas():
    official = torch.tensor([1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0])
    torch.testing.assert_close(anchor_sigmas(8, 3.0), official, atol=1e-4, rtol=0)


def test_zimage_and_diffusers_conventions_differ_only_by_the_sigma_min_quirk():
    # Same first sigma, same terminal 0; diffusers' interior sigmas sit slightly lower.
    zimage, diffusers = anchor_sigmas(8, 3.0), anchor_sigmas(8, 3.0, convention="diffusers")
    assert zimage[0] == diffusers[0] == 1.0 and zimage[-1] == diffusers[-1] == 0.0
    assert bool((diffusers[1:-1] < zimage[1:-1]).all())


@pytest.mark.parametrize("convention", ["zimage", "diffusers"])
@pytest.mark.parametrize("steps,shift", [(1, 3.0), (4, 1.0), (8, 3.0), (30, 6.0), (7, 0.25)])
def test_anchor_sigmas_are_a_comfy_sigmas_tensor(convention, steps, shift):
    sigmas = anchor_sigmas(steps, shift, convention=convention)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    check_sigmas(sigmas)


def test_time_shift_is_the_rational_shift_in_both_time_conventions():
    sigma = torch.linspace(0, 1, 11, dtype=torch.float64)
    shift = 3.0
    torch.testing.assert_close(time_shift(sigma, shift), shift * sigma / (1 + (shift - 1) * sigma))
    # Lumina writes the same map in t = 1 - sigma as t / (t + s - s t).
    t = 1 - sigma
    torch.testing.assert_close(1 - time_shift(1 - t, shift), t / (t + shift - shift * t))
    assert time_shift(0.5, 1.0) == 0.5
    assert math.isclose(time_shift(0.5, 3.0), 0.75)


@pytest.mark.parametrize("convention", ["zimage", "diffusers"])
def test_denoise_keeps_the_tail_of_a_longer_schedule_like_basic_scheduler(convention):
    assert torch.equal(anchor_sigmas(8, 3.0, convention, denoise=1.0), anchor_sigmas(8, 3.0, convention))
    partial = anchor_sigmas(4, 3.0, convention, denoise=0.6)  # int(4 / 0.6) = 6 steps, last 5 kept
    assert torch.equal(partial, anchor_sigmas(6, 3.0, convention)[-5:])
    assert partial.shape == (5,) and partial[0] < 1.0 and partial[-1] == 0.0
    empty = anchor_sigmas(4, 3.0, convention, denoise=0.0)
    assert empty.shape == (0,)


@pytest.mark.parametrize("shift", [None, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 5, 40])
def test_sigmoid_is_strictly_descending_with_exact_endpoints(steps, shift):
    for slope in (0.0, 0.5, 4.0, 10.0):
        for center in (0.0, 0.3, 0.5, 0.8, 1.0):
            sigmas = sigmoid_sigmas(steps, slope=slope, center=center, shift=shift)
            assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
            assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
            assert bool((sigmas[1:] < sigmas[:-1]).all()), (slope, center)


def test_sigmoid_spends_small_steps_at_both_ends():
    sizes = -sigmoid_sigmas(10).diff()
    middle = sizes[4:6].min()
    assert sizes[0] < middle and sizes[-1] < middle
    torch.testing.assert_close(sizes, sizes.flip(0))  # centre 0.5 is symmetric


def test_sigmoid_limits_and_shift():
    torch.testing.assert_close(sigmoid_sigmas(6, slope=0.0), torch.linspace(1, 0, 7))
    torch.testing.assert_close(sigmoid_sigmas(6, slope=1e-6), torch.linspace(1, 0, 7))
    plain = sigmoid_sigmas(6, slope=4.0).double()
    torch.testing.assert_close(sigmoid_sigmas(6, slope=4.0, shift=3.0), time_shift(plain, 3.0).float())


def test_sigmoid_denoise_like_basic_scheduler():
    assert torch.equal(sigmoid_sigmas(3, denoise=0.5), sigmoid_sigmas(6)[-4:])
    assert sigmoid_sigmas(3, denoise=0.0).shape == (0,)


@pytest.mark.parametrize(
    "call, names",
    [
        (lambda: anchor_sigmas(0, 3.0), "steps"),
        (lambda: anchor_sigmas(-2, 3.0), "steps"),
        (lambda: anchor_sigmas(2.5, 3.0), "steps"),
        (lambda: anchor_sigmas(True, 3.0), "steps"),
        (lambda: anchor_sigmas(8, 0.0), "shift"),
        (lambda: anchor_sigmas(8, -1.0), "shift"),
        (lambda: anchor_sigmas(8, float("nan")), "shift"),
        (lambda: anchor_sigmas(8, float("inf")), "shift"),
        (lambda: anchor_sigmas(8, 3.0, convention="flux"), "convention"),
        (lambda: anchor_sigmas(8, 3.0, denoise=1.5), "denoise"),
        (lambda: anchor_sigmas(8, 3.0, denoise=-0.1), "denoise"),
        (lambda: time_shift(0.5, 0.0), "shift"),
        (lambda: sigmoid_sigmas(0), "steps"),
        (lambda: sigmoid_sigmas(8, slope=-1.0), "slope"),
        (lambda: sigmoid_sigmas(8, slope=float("inf")), "slope"),
        (lambda: sigmoid_sigmas(8, center=1.5), "center"),
        (lambda: sigmoid_sigmas(8, center=-0.1), "center"),
        (lambda: sigmoid_sigmas(8, shift=0.0), "shift"),
        # so steep that float32 neighbours near the ends collapse: not strictly descending
        (lambda: sigmoid_sigmas(200, slope=200.0), "slope"),
    ],
)
def test_bad_input_raises_a_value_error_naming_the_input(call, names):
    with pytest.raises(ValueError, match=names):
        call()


@pytest.mark.parametrize(
    "sigmas, message",
    [
        (torch.tensor([1.0]), "at least 2"),
        (torch.tensor([1.0, 0.5, 0.6, 0.0]), "strictly descending"),
        (torch.tensor([1.0, 0.5, 0.1]), "end exactly at 0"),
        (torch.tensor([0.9, 0.5, 0.0]), "start exactly at 1"),
        (torch.tensor([1.0, float("nan"), 0.0]), "finite"),
    ],
)
def test_check_sigmas_rejects_malformed_schedules(sigmas, message):
    with pytest.raises(ValueError, match=message):
        check_sigmas(sigmas)
