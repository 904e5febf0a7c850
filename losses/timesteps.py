"""Training-sigma sampling: AC-RF anchors with jitter, uniform and shifted-sigmoid (logit-normal).

Time convention: ComfyUI sigma (1 = noise, 0 = data); Lumina t = 1 - sigma; diffusers timestep =
1000 sigma. Every sampler draws from a caller-owned ``torch.Generator`` only, so saving and
restoring ``generator.get_state()`` resumes the exact same sequence. Draws happen on the
generator's device; move the result where it is needed.

Sampled sigmas are clamped into [0.001, 0.999] (AC-RF's range): sigma 0 carries no noise to learn
from and sigma 1 no signal.
"""

from __future__ import annotations

import torch

from ..samplers.flow import time_shift

TRAINING_SIGMA_RANGE = (0.001, 0.999)
TIMESTEP_METHODS = ("anchor", "uniform", "shifted_sigmoid")


def _check_generator(generator) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            f"generator must be a torch.Generator (needed for exact resume), got {type(generator).__name__}"
        )
    return generator


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _clamp_training(sigmas: torch.Tensor) -> torch.Tensor:
    return sigmas.clamp(*TRAINING_SIGMA_RANGE)


def training_anchor_sigmas(
    turbo_steps: int = 10, shift: float = 3.0, convention: str = "zimage", denoise: float = 1.0
) -> torch.Tensor:
    """The ``turbo_steps`` anchor sigmas (ComfyUI sigma, descending, 0 excluded) an AC-RF LoRA trains on.

    The first ``turbo_steps`` entries of ``samplers.schedules.anchor_sigmas`` (whose schedule ends in
    the terminal 0), so training and the LTAnchorScheduler share one definition. AC-RF defaults:
    turbo_steps = 10, shift = 3.0. AC-RF built these with diffusers' scheduler
    (``convention="diffusers"``); ``"zimage"`` is the official Z-Image schedule.
    """
    from ..samplers.schedules import anchor_sigmas  # lazy: losses/ imports nothing heavy at load time

    schedule = anchor_sigmas(turbo_steps, shift, convention=convention, denoise=denoise)
    return schedule[:-1].clone()


def sample_anchor_indices(
    batch_size: int, num_anchors: int, generator: torch.Generator, taken=None
) -> torch.Tensor:
    """Anchor indices [B] (int64): stratified when the batch has >= num_anchors samples, else uniform with
    replacement.

    Stratified (AC-RF): every anchor appears floor(B / N) times, the B mod N remaining slots take
    distinct anchors drawn without replacement, then the batch is shuffled. So one batch of B >= N
    covers every anchor, and no anchor is over-represented by more than one.

    ``taken``: anchor indices of samples already in the batch (replayed samples keep theirs). The B
    new indices then complete the stratification of the whole batch of B + len(taken): each goes to
    an anchor with the fewest samples so far (ties drawn at random), so the whole batch covers every
    anchor and, unless ``taken`` alone over-fills one, no anchor has more than one sample above another.
    """
    batch_size = _check_batch_size(batch_size)
    generator = _check_generator(generator)
    if isinstance(num_anchors, bool) or not isinstance(num_anchors, int) or num_anchors < 1:
        raise ValueError(f"num_anchors must be a positive integer, got {num_anchors!r}")
    device = generator.device
    taken = torch.as_tensor([] if taken is None else taken, dtype=torch.int64).flatten().to(device)
    if ((taken < 0) | (taken >= num_anchors)).any():
        raise ValueError(f"taken: anchor indices must lie in [0, {num_anchors}), got {taken.tolist()}")
    if batch_size + taken.numel() < num_anchors:
        return torch.randint(0, num_anchors, (batch_size,), generator=generator, device=device)
    if taken.numel():
        return _complete_strata(batch_size, torch.bincount(taken, minlength=num_anchors), generator)
    full_rounds = torch.arange(num_anchors, device=device).repeat(batch_size // num_anchors)
    remainder = torch.randperm(num_anchors, generator=generator, device=device)[: batch_size % num_anchors]
    indices = torch.cat([full_rounds, remainder])
    return indices[torch.randperm(batch_size, generator=generator, device=device)]


def _complete_strata(batch_size: int, counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` anchor indices, each added to an anchor of least count (water filling), shuffled."""
    device = generator.device
    counts = counts.clone()
    chosen, need = [], batch_size
    while need > 0:
        candidates = (counts == counts.min()).nonzero().flatten()
        if candidates.numel() > need:
            candidates = candidates[
                torch.randperm(candidates.numel(), generator=generator, device=device)[:need]
            ]
        counts[candidates] += 1
        chosen.append(candidates)
        need -= candidates.numel()
    indices = torch.cat(chosen)
    return indices[torch.randperm(batch_size, generator=generator, device=device)]


def jitter_sigmas(sigmas: torch.Tensor, jitter_scale: float, generator: torch.Generator) -> torch.Tensor:
    """sigma + N(0, 1) * jitter_scale, clamped into [0.001, 0.999] (ComfyUI sigma, 1 = noise).

    AC-RF's anchor jitter (default 0.02) so the LoRA also sees sigmas near each anchor. The clamp
    maps half of the jittered draws of anchor 1.0 onto 0.999, as AC-RF does. A noise draw is made
    even when jitter_scale is 0, so the generator advances identically for any scale.
    """
    generator = _check_generator(generator)
    if isinstance(jitter_scale, bool) or not float(jitter_scale) >= 0:
        raise ValueError(f"jitter_scale must be >= 0, got {jitter_scale!r}")
    noise = torch.randn(sigmas.shape, generator=generator, device=generator.device, dtype=sigmas.dtype)
    return _clamp_training(sigmas + noise.to(sigmas.device) * float(jitter_scale))


def sample_anchor_sigmas(
    batch_size: int,
    anchors: torch.Tensor,
    generator: torch.Generator,
    *,
    jitter_scale: float = 0.02,
    taken=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AC-RF training sigmas: (sigmas [B], anchor indices [B]); ComfyUI sigma, 1 = noise.

    Indices from :func:`sample_anchor_indices` (``taken``: anchor indices already in the batch), then
    :func:`jitter_sigmas`. ``anchors`` usually comes from :func:`training_anchor_sigmas`.
    """
    anchors = torch.as_tensor(anchors, dtype=torch.float32).flatten()
    if anchors.numel() == 0 or (anchors < 0).any() or (anchors > 1).any():
        raise ValueError(f"anchors must be a non-empty list of sigmas in [0, 1], got {anchors.tolist()}")
    indices = sample_anchor_indices(batch_size, anchors.numel(), generator, taken=taken)
    chosen = anchors.to(indices.device)[indices]
    return jitter_sigmas(chosen, jitter_scale, generator), indices


def sample_uniform_sigmas(batch_size: int, generator: torch.Generator, *, shift: float = 1.0) -> torch.Tensor:
    """sigma ~ U(0, 1), then the rational shift, clamped to [0.001, 0.999]; [B], ComfyUI sigma.

    AC-RF's non-Turbo mode (``enable_turbo=False``) with its ``shift``.
    """
    batch_size = _check_batch_size(batch_size)
    generator = _check_generator(generator)
    uniform = torch.rand(batch_size, generator=generator, device=generator.device)
    return _clamp_training(time_shift(uniform, shift))


def sample_shifted_sigmoid_sigmas(
    batch_size: int,
    generator: torch.Generator,
    *,
    shift: float = 3.0,
    sigmoid_mean: float = 0.0,
    sigmoid_scale: float = 1.0,
) -> torch.Tensor:
    """Logit-normal sigma = sigmoid(mean + scale z), z ~ N(0, 1), then the rational shift; [B].

    SD3's rf/lognorm(m, s) density 1/(s sqrt(2 pi)) 1/(t(1-t)) exp(-(logit t - m)^2 / (2 s^2)),
    followed by sigma' = shift sigma / (1 + (shift - 1) sigma) (musubi/sd-scripts "shift" sampling;
    the AC-RF write-up's "shifted sigmoid, shift 3.0"). Clamped to [0.001, 0.999]. ComfyUI sigma, 1 = noise.
    """
    batch_size = _check_batch_size(batch_size)
    generator = _check_generator(generator)
    if not float(sigmoid_scale) > 0:
        raise ValueError(f"sigmoid_scale must be > 0, got {sigmoid_scale!r}")
    normal = torch.randn(batch_size, generator=generator, device=generator.device)
    sigma = torch.sigmoid(float(sigmoid_mean) + float(sigmoid_scale) * normal)
    return _clamp_training(time_shift(sigma, shift))


def sample_training_sigmas(
    batch_size: int,
    generator: torch.Generator,
    *,
    method: str = "anchor",
    anchors: torch.Tensor | None = None,
    jitter_scale: float = 0.02,
    shift: float = 3.0,
    sigmoid_mean: float = 0.0,
    sigmoid_scale: float = 1.0,
) -> torch.Tensor:
    """One batch of training sigmas [B] (ComfyUI sigma, 1 = noise) by ``method``:

    ``"anchor"`` (needs ``anchors``; uses ``jitter_scale``), ``"uniform"`` (uses ``shift``; AC-RF
    non-Turbo), ``"shifted_sigmoid"`` (uses ``shift``, ``sigmoid_mean``, ``sigmoid_scale``).
    """
    if method == "anchor":
        if anchors is None:
            raise ValueError("method 'anchor' needs anchors (see training_anchor_sigmas)")
        return sample_anchor_sigmas(batch_size, anchors, generator, jitter_scale=jitter_scale)[0]
    if method == "uniform":
        return sample_uniform_sigmas(batch_size, generator, shift=shift)
    if method == "shifted_sigmoid":
        return sample_shifted_sigmoid_sigmas(
            batch_size, generator, shift=shift, sigmoid_mean=sigmoid_mean, sigmoid_scale=sigmoid_scale
        )
    raise ValueError(f"timestep method must be one of {TIMESTEP_METHODS}, got {method!r}")
