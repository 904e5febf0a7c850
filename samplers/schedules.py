"""Sigma schedules for flow-matching models: AC-RF anchors and the Lumina-Next sigmoid (shift: samplers/flow.py).

Time convention used everywhere in this module: **ComfyUI sigma**, 1 = pure noise, 0 = data, with
``x_sigma = (1 - sigma) * x0 + sigma * noise``. Lumina code uses ``t = 1 - sigma`` (t = 0 is noise);
diffusers passes ``timestep = 1000 * sigma``. Every schedule returned here is a ComfyUI SIGMAS
tensor: float32, 1-D, length ``steps + 1``, strictly descending, ending exactly at 0.
"""

import math
from numbers import Real

import torch

from .flow import check_shift, time_shift

ANCHOR_CONVENTIONS = ("zimage", "diffusers")
# Defaults chosen by the sigmoid sweep of benchmarks/bench_schedules.py (see sigmoid_sigmas).
SIGMOID_DEFAULT_SLOPE = 2.0
SIGMOID_DEFAULT_CENTER = 0.5
_DIFFUSERS_TRAIN_TIMESTEPS = 1000
# Bound on the schedule actually built (steps / denoise): 100k float64 sigmas take ~1 ms and 1 MB;
# without it steps 1000 at denoise 1e-5 built 1e8 sigmas (seconds, GBs) on the caller's thread.
MAX_TOTAL_STEPS = 100_000


def check_steps(steps, name: str = "steps") -> int:
    """Return ``steps`` as an int, or raise ValueError unless it is a whole number >= 1.

    Steps count sigma intervals (ComfyUI convention: a schedule of ``steps`` has ``steps + 1`` sigmas,
    sigma 1 = noise ... 0 = data).
    """
    if isinstance(steps, bool) or not isinstance(steps, Real) or steps != int(steps) or steps < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {steps!r}")
    return int(steps)


def check_denoise(denoise, name: str = "denoise") -> float:
    """Return ``denoise`` as a float, or raise ValueError unless it lies in [0, 1].

    denoise = 1 starts at sigma 1 (pure noise, ComfyUI convention); smaller values start lower.
    """
    if isinstance(denoise, bool) or not isinstance(denoise, Real) or not 0.0 <= denoise <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {denoise!r}")
    return float(denoise)


def check_sigmas(sigmas: torch.Tensor, name: str = "sigmas", start: float | None = 1.0) -> torch.Tensor:
    """Raise ValueError unless ``sigmas`` is a 1-D, strictly descending schedule that ends at 0.

    ComfyUI sigma convention (1 = noise, 0 = data). ``start`` is the first value required (None: any
    value in (0, 1]). Returns ``sigmas`` unchanged so the call can be chained.
    """
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor of at least 2 sigmas, got {sigmas!r}")
    if not torch.isfinite(sigmas).all():
        raise ValueError(f"{name} must be finite, got {sigmas.tolist()}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"{name} must be strictly descending (1 = noise -> 0 = data), got {sigmas.tolist()}")
    if float(sigmas[-1]) != 0.0:
        raise ValueError(f"{name} must end exactly at 0 (data), got last value {float(sigmas[-1])!r}")
    first = float(sigmas[0])
    if start is not None and first != start:
        raise ValueError(f"{name} must start exactly at {start} (noise), got {first!r}")
    if first > 1.0:
        raise ValueError(f"{name} must not exceed 1 (pure noise), got first value {first!r}")
    return sigmas


def total_steps(steps: int, denoise: float) -> int:
    """Intervals of the full schedule that ``steps`` at ``denoise`` keeps the tail of (BasicScheduler's
    ``int(steps / denoise)``); ValueError naming denoise when it exceeds MAX_TOTAL_STEPS."""
    if denoise >= 1.0:
        total = float(steps)
    else:
        total = steps / denoise  # a float first: int() of inf (denoise 5e-324) would overflow
    if not total <= MAX_TOTAL_STEPS:
        raise ValueError(
            f"denoise {denoise!r} with {steps} steps needs a schedule of {total:.3g} steps; at most "
            f"{MAX_TOTAL_STEPS} (use denoise >= {steps / MAX_TOTAL_STEPS:.3g} or fewer steps)"
        )
    return int(total)


def _with_denoise(build, steps: int, denoise: float) -> torch.Tensor:
    # Same rule as ComfyUI's BasicScheduler: a longer schedule whose tail we keep.
    if denoise <= 0.0:
        return torch.zeros(0, dtype=torch.float32)
    return build(total_steps(steps, denoise))[-(steps + 1) :]


def _pin_endpoints(sigmas: torch.Tensor) -> torch.Tensor:
    # Rounding in the shift formula can miss 1 or 0 by an ulp; schedules promise exact endpoints.
    sigmas = sigmas.to(torch.float32)
    sigmas[0] = 1.0
    sigmas[-1] = 0.0
    return sigmas


def _zimage_anchors(steps: int, shift: float) -> torch.Tensor:
    # Official Z-Image: linspace(1000, 0, N + 1)[:-1] / 1000, shifted, then a terminal 0.
    uniform = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return _pin_endpoints(time_shift(uniform, shift))


def _diffusers_anchors(steps: int, shift: float) -> torch.Tensor:
    # FlowMatchEulerDiscreteScheduler(shift).set_timesteps(N): its sigma_min is the *already shifted*
    # smallest entry of the 1000-entry table (computed in float32), and the linspace between
    # sigma_max and sigma_min is shifted again. The last non-zero sigma is therefore not 1/N-uniform.
    table_ends = torch.tensor([1000.0, 1.0], dtype=torch.float32) / _DIFFUSERS_TRAIN_TIMESTEPS
    table_ends = time_shift(table_ends, shift)
    sigma_max, sigma_min = (float(v) for v in table_ends)
    timesteps = torch.linspace(
        sigma_max * _DIFFUSERS_TRAIN_TIMESTEPS,
        sigma_min * _DIFFUSERS_TRAIN_TIMESTEPS,
        steps,
        dtype=torch.float64,
    )
    sigmas = timesteps / _DIFFUSERS_TRAIN_TIMESTEPS
    sigmas = time_shift(sigmas, shift)
    return torch.cat([sigmas.to(torch.float32), torch.zeros(1, dtype=torch.float32)])


def anchor_sigmas(steps: int, shift: float, convention: str = "zimage", denoise: float = 1.0) -> torch.Tensor:
    """The exact sigmas a flow model (Z-Image-Turbo, an AC-RF LoRA) was trained/distilled on.

    Time convention: ComfyUI sigma (1 = noise, 0 = data); Lumina t = 1 - sigma; the diffusers
    timestep of each anchor is ``1000 * sigma``. The LoRA trainer imports this same function for its
    training anchors, so sampling and training share one definition.

    Conventions:
      * ``"zimage"``: ``time_shift(linspace(1, 0, steps + 1), shift)``, the official Z-Image scheduler.
        For steps 8, shift 3: 1, .9545, .9, .8333, .75, .6429, .5, .3, 0.
      * ``"diffusers"``: exactly ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)``'s
        ``.sigmas``, including its quirk of spacing linearly down to the shifted ``sigma_min`` of the
        1000-entry training table and shifting again.

    ``denoise`` < 1 works like ComfyUI's BasicScheduler: build ``int(steps / denoise)`` steps and keep
    the last ``steps + 1`` sigmas; ``denoise`` 0 returns an empty tensor.

    Returns a float32 tensor of length ``steps + 1`` (descending, ending exactly at 0).
    """
    steps = check_steps(steps)
    shift = check_shift(shift)
    denoise = check_denoise(denoise)
    if convention == "zimage":
        build = _zimage_anchors
    elif convention == "diffusers":
        build = _diffusers_anchors
    else:
        raise ValueError(f"convention must be one of {ANCHOR_CONVENTIONS}, got {convention!r}")
    return _with_denoise(lambda n: build(n, shift), steps, denoise)


def _sigmoid_curve(steps: int, slope: float, center: float) -> torch.Tensor:
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if slope == 0.0:
        return 1.0 - u  # the limit of the normalised logistic as slope -> 0
    top = torch.sigmoid(torch.tensor(slope * center, dtype=torch.float64))
    bottom = torch.sigmoid(torch.tensor(slope * (center - 1.0), dtype=torch.float64))
    return (torch.sigmoid(slope * (center - u)) - bottom) / (top - bottom)


def sigmoid_sigmas(
    steps: int,
    slope: float = SIGMOID_DEFAULT_SLOPE,
    center: float = SIGMOID_DEFAULT_CENTER,
    shift: float | None = None,
    denoise: float = 1.0,
) -> torch.Tensor:
    """Lumina-Next style sigmoid time discretisation: small steps at both ends, large in the middle.

    Time convention: ComfyUI sigma (1 = noise, 0 = data); Lumina t = 1 - sigma; diffusers timestep =
    1000 * sigma.

    Parametrisation (ours: the Lumina-Next paper's own formula is not in any released code). With the
    uniform step fraction ``u_i = i / steps`` (i = 0 .. steps) and the logistic ``L(z) = 1/(1+e^-z)``::

        sigma_i = (L(slope * (center - u_i)) - L(slope * (center - 1))) / (L(slope * center) - L(slope * (center - 1)))

    i.e. a logistic curve in the step index, rescaled so that sigma_0 = 1 and sigma_steps = 0 exactly.
    It is strictly decreasing for every ``slope`` > 0; the steps are smallest at both ends and
    largest at step fraction ``center``. ``slope`` = 0 is the uniform schedule ``1 - u`` (its limit);
    larger slopes concentrate more steps at the ends. ``center`` in [0, 1]: 0.5 is symmetric,
    a smaller value puts the large steps earlier (more steps near the data end).

    If ``shift`` is given, ``time_shift(sigma, shift)`` is applied afterwards (e.g. a model's own
    shift: 3 for Z-Image, 6 for Lumina-Image-2.0); endpoints stay exact.

    Defaults (slope 2.0, center 0.5) come from the sigmoid sweep of ``make bench BENCH=schedules``
    (numbers in the README and benchmarks/results/schedules.json). Steeper slopes starve the middle,
    where trajectories choose their mode. Those mixtures need no shift; image models at high resolution
    do (pass their shift).

    ``denoise`` < 1 works like ComfyUI's BasicScheduler (build ``int(steps / denoise)`` steps and keep
    the last ``steps + 1``); 0 returns an empty tensor. Raises ValueError for steps < 1, slope < 0,
    center outside [0, 1], shift <= 0, or a slope so steep that float32 sigmas stop decreasing.
    """
    steps = check_steps(steps)
    denoise = check_denoise(denoise)
    if isinstance(slope, bool) or not isinstance(slope, Real) or not math.isfinite(slope) or slope < 0:
        raise ValueError(f"slope must be a finite number >= 0 (0 = uniform), got {slope!r}")
    if isinstance(center, bool) or not isinstance(center, Real) or not 0.0 <= center <= 1.0:
        raise ValueError(f"center must be a step fraction in [0, 1], got {center!r}")
    if shift is not None:
        shift = check_shift(shift)

    def build(n: int) -> torch.Tensor:
        sigmas = _sigmoid_curve(n, float(slope), float(center))
        if shift is not None:
            sigmas = time_shift(sigmas, shift)
        sigmas = _pin_endpoints(sigmas)
        if not bool((sigmas[1:] < sigmas[:-1]).all()):
            raise ValueError(
                f"slope {slope!r} is too steep for {n} steps: neighbouring sigmas collapse to the same "
                "float32 value, so the schedule would not be strictly descending; use a smaller slope"
            )
        return sigmas

    return _with_denoise(build, steps, denoise)
