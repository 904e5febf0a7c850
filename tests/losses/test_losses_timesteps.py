"""Training-sigma samplers: determinism, stratification, jitter and distribution checks."""

import pytest
import torch
from scipy import stats

from lumina_turbo.losses import (
    sample_anchor_sigmas,
    sample_shifted_sigmoid_sigmas,
    sample_training_sigmas,
    sample_uniform_sigmas,
    training_anchor_sigmas,
)
from lumina_turbo.losses.timesteps import jitter_sigmas, sample_anchor_indices
from lumina_turbo.samplers.flow import time_shift

ANCHORS = torch.tensor([1.0, 0.96, 0.913, 0.858, 0.79, 0.707, 0.602, 0.465, 0.278, 0.0089])


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("method", ["anchor", "uniform", "shifted_sigmoid"])
def test_same_generator_state_same_sigmas(method):
    generator = _gen(7)
    sample_training_sigmas(5, generator, method=method, anchors=ANCHORS)  # advance, then checkpoint
    state = generator.get_state()
    first = sample_training_sigmas(6, generator, method=method, anchors=ANCHORS)
    generator.set_state(state)
    resumed = sample_training_sigmas(6, generator, method=method, anchors=ANCHORS)
    torch.testing.assert_close(first, resumed, rtol=0, atol=0)
    other = sample_training_sigmas(6, _gen(8), method=method, anchors=ANCHORS)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("batch_size", [10, 13, 27])
def test_stratified_indices_cover_every_anchor(batch_size):
    for seed in range(5):
        indices = sample_anchor_indices(batch_size, 10, _gen(seed))
        counts = torch.bincount(indices, minlength=10)
        assert counts.min() == batch_size // 10 and counts.max() <= batch_size // 10 + 1
        assert counts.sum() == batch_size


@pytest.mark.parametrize(
    ("batch_size", "taken"), [(8, [3, 7]), (10, [0, 1, 2]), (6, [9, 2, 4, 5]), (9, [2]), (15, [1, 1, 6])]
)
def test_new_indices_complete_the_stratification_of_the_whole_batch(batch_size, taken):
    total = batch_size + len(taken)
    for seed in range(20):
        fresh = sample_anchor_indices(batch_size, 10, _gen(seed), taken=taken)
        assert fresh.shape == (batch_size,)
        counts = torch.bincount(torch.cat([torch.tensor(taken), fresh]), minlength=10)
        # the whole batch is stratified exactly as a batch of `total` fresh draws would be
        assert counts.min() == total // 10 and counts.max() <= total // 10 + 1, (taken, fresh)
    # ties are drawn at random, and the result is shuffled
    orders = {
        tuple(sample_anchor_indices(batch_size, 10, _gen(seed), taken=taken).tolist()) for seed in range(6)
    }
    assert len(orders) > 1


def test_taken_indices_over_one_anchor_and_small_batches():
    # two replays at anchor 0 already exceed its share in a batch of 10: the fresh draws avoid it
    fresh = sample_anchor_indices(8, 10, _gen(0), taken=[0, 0])
    assert 0 not in fresh.tolist()
    counts = torch.bincount(torch.cat([torch.tensor([0, 0]), fresh]), minlength=10)
    assert counts.max() == 2 and (counts[1:] <= 1).all()
    # fewer than N in the whole batch: uniform draws, as without replays
    small = torch.cat([sample_anchor_indices(2, 10, _gen(seed), taken=[4]) for seed in range(300)])
    assert torch.bincount(small, minlength=10).min() > 30
    with pytest.raises(ValueError, match="taken"):
        sample_anchor_indices(4, 10, _gen(0), taken=[10])
    _, taken_too = sample_anchor_sigmas(9, ANCHORS, _gen(1), jitter_scale=0.0, taken=[5])
    assert sorted(taken_too.tolist()) == [0, 1, 2, 3, 4, 6, 7, 8, 9]


def test_stratified_order_is_shuffled_and_small_batches_in_range():
    orders = {tuple(sample_anchor_indices(10, 10, _gen(seed)).tolist()) for seed in range(5)}
    assert len(orders) == 5
    small = torch.cat([sample_anchor_indices(3, 10, _gen(seed)) for seed in range(200)])
    assert small.min() == 0 and small.max() == 9
    assert torch.bincount(small, minlength=10).min() > 30  # about 60 each


def test_zero_jitter_returns_clamped_anchors():
    sigmas, indices = sample_anchor_sigmas(20, ANCHORS, _gen(), jitter_scale=0.0)
    torch.testing.assert_close(sigmas, ANCHORS[indices].clamp(0.001, 0.999))


def test_jitter_is_gaussian_with_the_scale_and_clamped():
    base = torch.full((20000,), 0.5)
    jittered = jitter_sigmas(base, 0.02, _gen(1))
    assert abs(float(jittered.mean()) - 0.5) < 0.001
    assert abs(float(jittered.std()) - 0.02) < 0.001
    assert stats.kstest(((jittered - 0.5) / 0.02).numpy(), "norm").pvalue > 1e-3
    edges = jitter_sigmas(torch.tensor([1.0, 0.0] * 500), 0.05, _gen(2))
    assert edges.min() >= 0.001 and edges.max() <= 0.999


def test_uniform_with_shift_follows_the_shifted_cdf():
    sigmas = sample_uniform_sigmas(20000, _gen(3), shift=3.0).double().numpy()
    # P(shift(U) <= x) = P(U <= inverse_shift(x)), inverse of S u / (1 + (S - 1) u) is x / (S - (S - 1) x)
    result = stats.kstest(sigmas, lambda x: x / (3.0 - 2.0 * x))
    assert result.pvalue > 1e-3
    assert abs(float(torch.tensor(sigmas).median()) - 0.75) < 0.01


def test_shifted_sigmoid_follows_the_logit_normal_then_shift():
    mean, scale, shift = 0.3, 0.8, 3.0
    sigmas = sample_shifted_sigmoid_sigmas(
        20000, _gen(4), shift=shift, sigmoid_mean=mean, sigmoid_scale=scale
    )

    def cdf(x):
        unshifted = x / (shift - (shift - 1) * x)
        return stats.norm.cdf((stats.logistic.ppf(unshifted) - mean) / scale)

    assert stats.kstest(sigmas.double().numpy(), cdf).pvalue > 1e-3
    assert sigmas.min() >= 0.001 and sigmas.max() <= 0.999


def test_rational_shift_values():
    torch.testing.assert_close(time_shift(torch.tensor([0.0, 0.5, 1.0]), 3.0), torch.tensor([0.0, 0.75, 1.0]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="generator"):
        sample_uniform_sigmas(2, None)
    with pytest.raises(ValueError, match="batch_size"):
        sample_uniform_sigmas(0, _gen())
    with pytest.raises(ValueError, match="jitter_scale"):
        sample_anchor_sigmas(2, ANCHORS, _gen(), jitter_scale=-0.1)
    with pytest.raises(ValueError, match="needs anchors"):
        sample_training_sigmas(2, _gen(), method="anchor")
    with pytest.raises(ValueError, match="timestep method"):
        sample_training_sigmas(2, _gen(), method="cosine")
    with pytest.raises(ValueError, match="shift"):
        sample_shifted_sigmoid_sigmas(2, _gen(), shift=0.0)
    with pytest.raises(ValueError, match="anchors"):
        sample_anchor_sigmas(2, torch.tensor([1.5]), _gen())


def test_training_anchors_come_from_the_shared_schedule():
    from lumina_turbo.samplers import schedules

    anchors = training_anchor_sigmas(10, 3.0)
    schedule = schedules.anchor_sigmas(10, 3.0, convention="zimage", denoise=1.0)
    assert anchors.shape == (10,)
    torch.testing.assert_close(anchors, schedule[:10])
    assert (anchors > 0).all() and (anchors[1:] < anchors[:-1]).all()
    diffusers = training_anchor_sigmas(10, 3.0, convention="diffusers")
    torch.testing.assert_close(diffusers, ANCHORS, atol=6e-4, rtol=0)  # research note 1.2 table
