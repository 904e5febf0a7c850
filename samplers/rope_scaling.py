"""RoPE frequency scaling for resolution extrapolation: PI, NTK-aware, Frequency- and Time-Aware.

Pure torch (no ComfyUI import). Notation, per RoPE axis (NextDiT has three: caption index, row,
column; only the image axes are scaled):

* ``d``: the axis' rotary width; it carries ``d/2`` frequencies ``w_i = b^(-2i/d)``, i = 0..d/2-1
  (exactly ComfyUI's ``comfy.ldm.flux.math.rope``: ``1 / theta ** linspace(0, (d-2)/d, d/2)``);
* ``b``: the RoPE base theta (Lumina-2: 10000, Z-Image: 256);
* ``L``: the training length along the axis, in tokens (training resolution / (8 x patch 2));
* ``s``: scale = positions seen / ``L``; s <= 1 means no extrapolation and no change at all;
* time: ComfyUI sigma (1 = noise, 0 = data); Lumina t = 1 - sigma (0 = noise, 1 = data).

Modes (w'_i are the new frequencies):

* ``pi`` -- Position Interpolation, Chen et al. 2023, arXiv 2306.15595:
  ``w'_i = w_i / s`` (positions divided by s).
* ``ntk`` -- NTK-aware scaling (bloc97, 2023; written down in YaRN, Peng et al. 2023,
  arXiv 2309.00071, sec. 3.1): ``b' = b * s^(d/(d-2))``, ``w'_i = b'^(-2i/d)``; the highest frequency
  is kept and the lowest is divided by exactly s.
* ``frequency_aware`` -- Lumina-Next (Zhuo et al. 2024, arXiv 2406.18583, "Frequency-Aware Scaled
  RoPE"): ``d_target = d * log_b(L / 2pi)`` is the (2i-)dimension whose wavelength ``2pi / w``
  equals L; ``b' = b * s^(d/d_target)`` interpolates that dimension exactly, and
  ``w'_i = max(b'^(-2i/d), w_i / s)`` (NTK-like below d_target, PI beyond it).
* ``time_aware`` -- Lumina-Next ("Time-Aware Scaled RoPE"): ``d_t = (d - 1) t + 1``,
  ``b_t = b * s^(d/d_t)``, ``w'_i = max(b_t^(-2i/d), w_i / s)``: PI-like at the noise end (t = 0,
  global layout), NTK-like with base ``b * s`` at the data end (t = 1, local detail). The released
  Lumina-Next code uses a hard switch at t = 0.3 (PI before, base ``b * s`` after) instead of this
  smooth form; the paper's formula is implemented here.

Every mode is expressed as a *plan* ``(base, use_pi)``: frequency i is ``w_i / s`` where ``use_pi[i]``
and ``base^(-2i/d)`` elsewhere, so ComfyUI's own ``rope`` computes the tables (positions / s for PI,
a new theta for the rest).
"""

from __future__ import annotations

import math

import torch

MODES = ("none", "pi", "ntk", "frequency_aware", "time_aware")


def exponents(dim: int) -> torch.Tensor:
    """``2i/d`` for i = 0..d/2-1 (float64), as ComfyUI's rope builds them."""
    if dim % 2 or dim < 2:
        raise ValueError(f"dim: expected an even RoPE width >= 2, got {dim}")
    return torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64)


def base_frequencies(dim: int, theta: float) -> torch.Tensor:
    """``w_i = theta^(-2i/d)`` (float64)."""
    return 1.0 / (theta ** exponents(dim))


def ntk_base(dim: int, theta: float, scale: float) -> float:
    """NTK-aware base ``b * s^(d/(d-2))`` (bloc97; YaRN arXiv 2309.00071). Needs d > 2."""
    if dim <= 2:
        return theta * scale
    return theta * scale ** (dim / (dim - 2))


def frequency_aware_base(dim: int, theta: float, scale: float, train_len: float) -> float | None:
    """Lumina-Next ``b * s^(d/d_target)`` with ``d_target = d log_b(L/2pi)``; None when d_target <= 0
    (every wavelength already exceeds L, so every dimension is interpolated: pure PI)."""
    d_target = dim * math.log(train_len / (2 * math.pi)) / math.log(theta)
    if d_target <= 0:
        return None
    return theta * scale ** (dim / d_target)


def time_aware_base(dim: int, theta: float, scale: float, t: float) -> float:
    """Lumina-Next ``b * s^(d/d_t)`` with ``d_t = (d-1) t + 1``; t is Lumina time (0 = noise)."""
    t = min(1.0, max(0.0, float(t)))
    return theta * scale ** (dim / ((dim - 1) * t + 1))


def _clamped_plan(dim, theta, scale, base):
    ntk = base_frequencies(dim, base)
    pi = base_frequencies(dim, theta) / scale
    return base, pi > ntk


def rope_plan(
    mode: str, dim: int, theta: float, scale: float, train_len: float | None = None, t: float | None = None
) -> tuple[float, torch.Tensor]:
    """``(base, use_pi)`` for one axis: frequency i becomes ``w_i / s`` where ``use_pi[i]``, else
    ``base^(-2i/d)``. ``train_len`` (tokens) is needed by ``frequency_aware``, Lumina ``t``
    (1 - sigma) by ``time_aware``. With ``scale <= 1`` or mode ``none`` nothing changes."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    n = dim // 2
    if mode == "none" or scale <= 1.0:
        return float(theta), torch.zeros(n, dtype=torch.bool)
    if mode == "pi":
        return float(theta), torch.ones(n, dtype=torch.bool)
    if mode == "ntk":
        return ntk_base(dim, theta, scale), torch.zeros(n, dtype=torch.bool)
    if mode == "frequency_aware":
        if train_len is None:
            raise ValueError("train_len: frequency_aware needs the training length in tokens")
        base = frequency_aware_base(dim, theta, scale, train_len)
        if base is None:
            return float(theta), torch.ones(n, dtype=torch.bool)
        return _clamped_plan(dim, theta, scale, base)
    if t is None:
        raise ValueError("t: time_aware needs the Lumina time t = 1 - sigma")
    return _clamped_plan(dim, theta, scale, time_aware_base(dim, theta, scale, t))


def scaled_frequencies(
    mode: str, dim: int, theta: float, scale: float, train_len: float | None = None, t: float | None = None
) -> torch.Tensor:
    """The frequencies ``w'_i`` (float64) that :func:`rope_plan` describes."""
    base, use_pi = rope_plan(mode, dim, theta, scale, train_len, t)
    if mode == "none" or scale <= 1.0:
        return base_frequencies(dim, theta)
    return torch.where(use_pi, base_frequencies(dim, theta) / scale, base_frequencies(dim, base))
