"""CFG truncation and CFG renormalization for flow models: the pure-torch math behind LTCFGGuider/LTCFGPatch.

Time conventions (where most bugs live):

* **ComfyUI sigma** -- what every function here takes: 1 = pure noise, 0 = data. ``x = (1-sigma)*x0 + sigma*eps``.
* **Lumina t** = 1 - sigma (official Lumina-Image-2.0 and the Z-Image transformers: 0 = noise).
* **diffusers timestep** = 1000 * sigma (FlowMatchEulerDiscreteScheduler).

Velocities are in ComfyUI's convention, ``v = (x - denoised) / sigma = eps - x0`` (the CONST model output).
The diffusers Lumina2/Z-Image transformers output ``x0 - eps = -v``; both pipelines negate it before
``scheduler.step``. CFG is linear and every renorm here only uses norm ratios, so the guided result in
one convention is exactly minus the guided result in the other.

Every combination function is per-sample scale invariant: ``f(s*v_cond, s*v_uncond) = s*f(v_cond, v_uncond)``
for a positive per-sample ``s``. A guider may therefore pass ``x - denoised`` (= sigma*v) directly and avoid
dividing by sigma.
"""

from __future__ import annotations

import math

import torch

TRUNCATION_MODES = ("off", "step_fraction", "lumina_t", "zimage", "sigma", "last_steps")
CFG_FORMULAS = ("comfy", "zimage")
RENORM_MODES = ("off", "cap", "rescale_lastdim")

# A sigma above a schedule point by less than this fraction of the step above it is taken as that point
# (s_churn's sigma_hat, float noise). Sub-step evaluations (midpoint, dpm_2, dpmpp_2s) sit further inside
# the step that started at the larger point (an arithmetic midpoint at 50 %, a geometric one above 25 %
# while consecutive sigmas differ by less than 9x), so they keep their own step.
_ABOVE_POINT_TOLERANCE = 0.2


# --- validation -----------------------------------------------------------------------------------------


def _finite_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def validate_cfg(cfg: float, cfg_formula: str = "comfy") -> None:
    """Raise ValueError unless ``cfg`` is a finite number >= 0 and ``cfg_formula`` is known.

    ``comfy``: ComfyUI/official Lumina-2 scale w (1 = no guidance). ``zimage``: Z-Image's g (0 = no guidance,
    diffusers ZImagePipeline ``guidance_scale``). No time argument.
    """
    if cfg_formula not in CFG_FORMULAS:
        raise ValueError(f"cfg_formula must be one of {CFG_FORMULAS}, got {cfg_formula!r}")
    if _finite_number("cfg", cfg) < 0:
        raise ValueError(f"cfg must be >= 0, got {cfg!r}")


def validate_truncation(trunc_mode: str, trunc_value, *, value_name: str = "trunc_value") -> None:
    """Raise ValueError unless ``trunc_value`` lies in the range of ``trunc_mode``.

    ``value_name`` is how messages name the value (a node passes its input's name).

    Ranges: ``off`` any; ``step_fraction`` [0, 1] (a fraction of the steps); ``lumina_t`` and ``zimage``
    >= 0 in Lumina t = 1 - sigma (values >= 1 never truncate: the official default is 100, Z-Image's 1.0);
    ``sigma`` [0, 1] in ComfyUI sigma; ``last_steps`` an integer >= 0 (a whole float such as 5.0 is accepted).
    """
    if trunc_mode not in TRUNCATION_MODES:
        raise ValueError(f"trunc_mode must be one of {TRUNCATION_MODES}, got {trunc_mode!r}")
    if trunc_mode == "off":
        return
    value = _finite_number(value_name, trunc_value)
    if trunc_mode in ("step_fraction", "sigma") and not 0.0 <= value <= 1.0:
        raise ValueError(f"{value_name} for trunc_mode {trunc_mode!r} must be in [0, 1], got {trunc_value!r}")
    if trunc_mode in ("lumina_t", "zimage") and value < 0.0:
        raise ValueError(
            f"{value_name} for trunc_mode {trunc_mode!r} must be >= 0 (Lumina t), got {trunc_value!r}"
        )
    if trunc_mode == "last_steps" and (value < 0 or value != int(value)):
        raise ValueError(
            f"{value_name} for trunc_mode 'last_steps' must be an integer >= 0, got {trunc_value!r}"
        )


def validate_renorm(renorm_mode: str, renorm: float) -> None:
    """Raise ValueError unless ``renorm_mode`` is known and, for ``cap``, ``renorm`` is a finite number >= 0.

    ``renorm`` is the cap factor (0 = off) and is unused by ``off`` and ``rescale_lastdim``. No time argument.
    """
    if renorm_mode not in RENORM_MODES:
        raise ValueError(f"renorm_mode must be one of {RENORM_MODES}, got {renorm_mode!r}")
    if renorm_mode == "cap" and _finite_number("renorm", renorm) < 0:
        raise ValueError(f"renorm must be >= 0 (0 = off), got {renorm!r}")


# --- truncation -----------------------------------------------------------------------------------------


def _as_float(sigma) -> float:
    # ComfyUI passes one sigma per batch row, all equal.
    if isinstance(sigma, torch.Tensor):
        return float(sigma.reshape(-1)[0])
    return float(sigma)


def step_position(sigma, sample_sigmas) -> tuple[int, bool]:
    """Where a model call at ComfyUI ``sigma`` (1 = noise) sits on the schedule: ``(step, at_start)``.

    ``step`` is the 0-based index of the sampling step the sigma falls in, ``at_start`` whether the sigma is
    that step's start point rather than strictly inside the step. ``sigma`` is a float or the per-row
    ``timestep`` tensor; ``sample_sigmas`` the 1-D descending schedule ComfyUI puts in
    ``transformer_options["sample_sigmas"]`` (N steps, N + 1 points, possibly a partial schedule after
    denoise < 1 or SplitSigmas: indices count within it). Step i runs from ``sample_sigmas[i]`` down to
    ``sample_sigmas[i+1]``:

    * a sigma on a schedule point is the start of the step that starts there;
    * a sigma strictly between two points (midpoint/heun-type sub-steps, an SDE sampler's 0.9999 for 1.0)
      is inside the step that started at the larger one;
    * a sigma slightly above a point (s_churn's sigma_hat: less than 20 % of the step above) counts as
      that point; anything above the first point is step 0's start, anything below the last start is
      inside step N - 1.
    """
    starts = torch.as_tensor(sample_sigmas).reshape(-1)[:-1].tolist()
    if not starts:
        raise ValueError("sample_sigmas must hold at least 2 points (one step)")
    s = _as_float(sigma)
    index = sum(1 for point in starts if point >= s) - 1
    if index < 0:
        return 0, True
    below = index + 1
    if below < len(starts) and s - starts[below] <= _ABOVE_POINT_TOLERANCE * (starts[index] - starts[below]):
        return below, True
    return index, s == starts[index]


def step_index(sigma, sample_sigmas) -> int:
    """0-based index of the sampling step a model call at ComfyUI ``sigma`` (1 = noise) falls in, from the
    sigma alone: the ``step`` of :func:`step_position` (same arguments and rules).

    A sigma cannot tell a heun corrector at ``sample_sigmas[i+1]`` (step i) from step i+1's first call
    there; samplers that report their steps (see ``samplers/sampler_steps.py``) settle that.
    """
    return step_position(sigma, sample_sigmas)[0]


def cfg_is_active(trunc_mode: str, trunc_value, sigma, sample_sigmas, step: int | None = None) -> bool:
    """Whether CFG is still applied to a model call at ComfyUI ``sigma`` (1 = noise) under ``trunc_mode``.

    Lumina t = 1 - sigma; diffusers timestep = 1000 * sigma. ``sample_sigmas`` as in :func:`step_position`;
    N = len(sample_sigmas) - 1 (steps in the schedule the sampler was given). i is ``step``, the sampler
    step the call belongs to when the caller knows it (every call of one step then gets one decision),
    else :func:`step_index` of ``sigma``; it is used by the step-indexed modes only.

    * ``off``: always.
    * ``step_fraction`` -- diffusers Lumina2Pipeline ``cfg_trunc_ratio``
      (pipeline_lumina2.py: ``do_classifier_free_truncation = (i + 1) / num_inference_steps > cfg_trunc_ratio``):
      while ``(i + 1) / N <= value``.
    * ``lumina_t`` -- official Lumina-Image-2.0 ``NextDiT.forward_with_cfg(cfg_trunc)``, ``if t[0] < cfg_trunc``:
      while ``1 - sigma < value``, decided per model call at the call's own sigma (the official midpoint
      solver's sub-steps included), in float32 as torch compares a float32 ``t`` with a Python float.
    * ``zimage`` -- Z-Image ``cfg_truncation`` (diffusers pipeline_z_image.py:
      ``t_norm = (1000 - timesteps.float()) / 1000``; guidance 0 when ``t_norm[i] > cfg_truncation``):
      while ``1 - sigma_i <= value`` with sigma_i = ``sample_sigmas[i]``, the step's start, and t_norm
      computed in float32 from the timestep 1000 * sigma_i as the pipeline does.
    * ``sigma``: while ``sigma >= value``, per model call.
    * ``last_steps`` -- the Wan 2.x recipe's ``cfg_truncate_steps`` (``is_final_steps = step_idx >= len(timesteps) - n``):
      while ``i < N - value``.
    """
    if trunc_mode == "off":
        return True
    if trunc_mode == "lumina_t":
        t = 1.0 - torch.tensor(_as_float(sigma), dtype=torch.float32)
        return bool(t < torch.tensor(float(trunc_value), dtype=torch.float32))
    if trunc_mode == "sigma":
        return _as_float(sigma) >= float(trunc_value)
    if trunc_mode not in ("step_fraction", "zimage", "last_steps"):
        raise ValueError(f"trunc_mode must be one of {TRUNCATION_MODES}, got {trunc_mode!r}")

    schedule = torch.as_tensor(sample_sigmas).reshape(-1)
    num_steps = schedule.numel() - 1
    index = step_index(sigma, schedule) if step is None else min(max(int(step), 0), num_steps - 1)
    if trunc_mode == "step_fraction":
        return (index + 1) / num_steps <= float(trunc_value)
    if trunc_mode == "last_steps":
        return index < num_steps - int(trunc_value)
    timestep = schedule[index].to(torch.float32) * 1000
    t_norm = float((1000 - timestep) / 1000)
    return t_norm <= float(trunc_value)


def guided_steps(trunc_mode: str, trunc_value, sample_sigmas) -> list[bool]:
    """For each of the N steps of ``sample_sigmas`` (ComfyUI sigma, 1 = noise), whether it is guided:
    :func:`cfg_is_active` at the step's start sigma (same sources and inequalities).

    Exact NFE accounting for the step-indexed modes: every model call of a guided step costs 2 batch rows,
    of an unguided one 1 (euler, dpmpp_2m: one call per step; heun, midpoint: two). ``lumina_t`` and
    ``sigma`` decide per call, so a later stage of a step may differ from the step's start.
    """
    schedule = torch.as_tensor(sample_sigmas).reshape(-1)
    return [
        cfg_is_active(trunc_mode, trunc_value, schedule[i], schedule) for i in range(schedule.numel() - 1)
    ]


# --- guided velocity ------------------------------------------------------------------------------------


def combine_cfg(
    v_cond: torch.Tensor, v_uncond: torch.Tensor, cfg: float, cfg_formula: str = "comfy"
) -> torch.Tensor:
    """Classifier-free guidance on two predictions; time-independent.

    ``comfy``: ``u + cfg * (c - u)`` -- ComfyUI ``cfg_function``, official Lumina-2 ``forward_with_cfg``,
    diffusers Lumina2Pipeline (1 = no guidance). ``zimage``: ``c + cfg * (c - u)`` -- diffusers/official
    ZImagePipeline (0 = no guidance), the same as ``comfy`` with cfg + 1. Each is written as its source
    writes it so results match to the last bit.
    """
    if cfg_formula == "comfy":
        return v_uncond + cfg * (v_cond - v_uncond)
    if cfg_formula == "zimage":
        return v_cond + cfg * (v_cond - v_uncond)
    raise ValueError(f"cfg_formula must be one of {CFG_FORMULAS}, got {cfg_formula!r}")


def comfy_cfg_scale(cfg: float, cfg_formula: str = "comfy") -> float:
    """The ComfyUI cfg scale w equivalent to ``cfg`` under ``cfg_formula`` (zimage g -> g + 1); 1 = no guidance."""
    validate_cfg(cfg, cfg_formula)
    return float(cfg) + 1.0 if cfg_formula == "zimage" else float(cfg)


def _sample_norms(v: torch.Tensor) -> torch.Tensor:
    # One L2 norm per sample over every non-batch dim; float32 at least so bf16 squares do not overflow.
    dtype = torch.promote_types(v.dtype, torch.float32)
    return torch.linalg.vector_norm(v.flatten(1).to(dtype), dim=1).reshape(-1, *([1] * (v.ndim - 1)))


def renorm_cap(v_guided: torch.Tensor, v_cond: torch.Tensor, renorm: float) -> torch.Tensor:
    """Cap each sample's global L2 norm (all non-batch dims) at ``renorm * ||v_cond||``; never scale up.

    Official Lumina-Image-2.0 ``forward_with_cfg(renorm_cfg)`` (``vector_norm`` over dims 1.., scale by
    ``max_new_norm / new_pos_norm`` when ``new_pos_norm >= max_new_norm``; its ``eps``/``rest`` split keeps
    all channels since out_channels == in_channels) and Z-Image ``cfg_normalization`` (the same with ``>``;
    equal norms give a factor 1 either way). Per sample, where the official code only works for batch 1.
    ``renorm`` 0 = off. Time-independent.
    """
    if renorm <= 0:
        return v_guided
    limit = renorm * _sample_norms(v_cond)
    norm = _sample_norms(v_guided)
    scale = torch.where(
        norm > limit, limit / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.ones_like(norm)
    )
    return (v_guided * scale).to(v_guided.dtype)


def renorm_rescale_lastdim(v_guided: torch.Tensor, v_cond: torch.Tensor) -> torch.Tensor:
    """Rescale to exactly ``||v_cond||`` along the LAST axis -- diffusers Lumina2Pipeline ``cfg_normalization``.

    pipeline_lumina2.py: ``cond_norm = torch.norm(noise_pred_cond, dim=-1, keepdim=True)``,
    ``noise_pred = noise_pred * (cond_norm / noise_norm)`` on the (B, C, H, W) transformer output: one norm
    per (sample, channel, row) over the latent width W; it can scale up as well as down. For (B, C, T, H, W)
    it is the same over W. Where the guided row norm is 0 the row is left unchanged (diffusers gives NaN).
    Time-independent.
    """
    cond_norm = torch.linalg.vector_norm(v_cond, dim=-1, keepdim=True)
    guided_norm = torch.linalg.vector_norm(v_guided, dim=-1, keepdim=True)
    scale = torch.where(guided_norm > 0, cond_norm / guided_norm, torch.ones_like(guided_norm))
    return v_guided * scale


def guided_velocity(
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor,
    cfg: float,
    *,
    cfg_formula: str = "comfy",
    renorm_mode: str = "cap",
    renorm: float = 1.0,
) -> torch.Tensor:
    """CFG then renorm, for a step where CFG is active; shapes (B, C, H, W) or (B, C, T, H, W).

    Velocities in ComfyUI's convention (sigma 1 = noise, v = (x - denoised) / sigma), or ``x - denoised``
    itself (scale invariance, see the module docstring). Defaults: ``cap`` with renorm 1.0, the official
    Lumina-Image-2.0 default (``forward_with_cfg(renorm_cfg=1)``, also ComfyUI RenormCFG's), a cap that
    only ever tames over-saturated guidance; ``rescale_lastdim`` is for matching diffusers Lumina2Pipeline.
    """
    if v_cond.shape != v_uncond.shape or v_cond.ndim < 2:
        raise ValueError(
            f"v_cond and v_uncond must have one shape with a batch dim, got {tuple(v_cond.shape)} and {tuple(v_uncond.shape)}"
        )
    guided = combine_cfg(v_cond, v_uncond, cfg, cfg_formula)
    if renorm_mode == "off":
        return guided
    if renorm_mode == "cap":
        return renorm_cap(guided, v_cond, renorm)
    if renorm_mode == "rescale_lastdim":
        return renorm_rescale_lastdim(guided, v_cond)
    raise ValueError(f"renorm_mode must be one of {RENORM_MODES}, got {renorm_mode!r}")
