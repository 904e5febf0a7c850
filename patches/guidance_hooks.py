"""ComfyUI side of CFG truncation and renormalization: model_options hooks shared by LTCFGGuider and LTCFGPatch.

The math (which steps are guided, CFG formulas, renorm) lives in ``samplers/guidance.py``; this module
only connects it to ComfyUI's sampling function (``comfy/samplers.py``) on a model clone:

0. a ``SAMPLER_SAMPLE`` wrapper wraps the sampler's step callback, so that every model call is placed in the
   sampler step it belongs to (``samplers/sampler_steps.py``: a heun corrector belongs to the step it
   corrects, although it is evaluated where the next step starts);
1. a ``PREDICT_NOISE`` wrapper decides, once per model call, which branches the call needs -- ``"both"``,
   ``"cond"`` or ``"uncond"`` -- from the call's sigma and step, ``transformer_options["sample_sigmas"]``
   and the guider's cfg, and hands the decision down in a copy of ``model_options``;
2. ``sampler_calc_cond_batch_function`` evaluates only those branches: a skipped branch is ``None`` in
   ``calc_cond_batch``, so its forward pass really never runs. A single branch is returned in both slots,
   so ComfyUI's pre/post-CFG hooks of other nodes see cond == uncond ("no guidance") instead of zeros;
3. ``sampler_cfg_function`` combines the two branches with our CFG formula and renorm.

Time convention: ComfyUI sigma (1 = noise); Lumina t = 1 - sigma; diffusers timestep = 1000 * sigma.
ComfyUI's cfg-1 shortcut is disabled on the clone because the wrapper makes that decision itself, in the
chosen ``cfg_formula``'s terms (Z-Image's g = 0 is ComfyUI's cfg 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..samplers import guidance
from ..samplers.sampler_steps import SamplerSteps

PLAN_KEY = "lumina_turbo_cfg_plan"  # model_options key carrying the wrapper's decision to the hooks
STEPS_KEY = "lumina_turbo_sampler_steps"  # model_options key carrying one run's SamplerSteps
# Calls between two step reports of ComfyUI samplers that evaluate a step's end point before the next step
# starts there (heun's corrector; dpm_2_ancestral's midpoint on a flow model, exp(lerp(log s, log s'^2/s)));
# until the run shows its pattern once, nothing else tells such a call from the next step's first.
END_POINT_SAMPLERS = {"sample_heun": 2, "sample_heunpp2": 3, "sample_dpm_2_ancestral": 2}
WRAPPER_KEY = "lumina_turbo_cfg"
AFTER_TRUNC = ("cond", "uncond")
PLANS = ("both", "cond", "uncond")


@dataclass(frozen=True)
class GuidanceSettings:
    """Every LTCFGGuider/LTCFGPatch option except cfg (the guider's, or the KSampler's for the patch)."""

    renorm: float = 1.0
    renorm_mode: str = "cap"
    trunc_mode: str = "off"
    trunc: float = 0.25
    after_trunc: str = "cond"
    cfg_formula: str = "comfy"

    def validate(self) -> GuidanceSettings:
        """Raise ValueError naming the offending input (renorm, renorm_mode, trunc, trunc_mode, ...)."""
        guidance.validate_renorm(self.renorm_mode, self.renorm)
        guidance.validate_truncation(self.trunc_mode, self.trunc, value_name="trunc")
        if self.after_trunc not in AFTER_TRUNC:
            raise ValueError(f"after_trunc must be one of {AFTER_TRUNC}, got {self.after_trunc!r}")
        if self.cfg_formula not in guidance.CFG_FORMULAS:
            raise ValueError(f"cfg_formula must be one of {guidance.CFG_FORMULAS}, got {self.cfg_formula!r}")
        return self

    def is_neutral(self, cfg: float) -> bool:
        """Whether ``cfg`` means "no guidance" in this formula (comfy 1, zimage 0): one branch everywhere."""
        return math.isclose(guidance.comfy_cfg_scale(cfg, self.cfg_formula), 1.0)

    def needs_negative(self, cfg: float) -> bool:
        """Whether some model call may evaluate the negative (unconditional) branch."""
        truncates_to_uncond = self.after_trunc == "uncond" and self.trunc_mode != "off"
        return not self.is_neutral(cfg) or truncates_to_uncond

    def plan(self, sigma, sample_sigmas, cfg: float, step: int | None = None) -> str:
        """Branches a model call at ComfyUI ``sigma`` needs: ``"both"``, ``"cond"`` or ``"uncond"``.

        ``sample_sigmas`` is the schedule the sampler was given (None outside sampling: the step-indexed
        modes then cannot truncate and CFG stays on); ``step`` the sampler step of the call when known
        (else it is derived from the sigma).
        """
        if sample_sigmas is None and self.trunc_mode in ("step_fraction", "zimage", "last_steps"):
            active = True
        else:
            active = guidance.cfg_is_active(self.trunc_mode, self.trunc, sigma, sample_sigmas, step=step)
        if not active:
            return self.after_trunc
        return "cond" if self.is_neutral(cfg) else "both"

    def combine(self, cond, uncond, cfg: float):
        """Guided ``x - denoised`` (= sigma * velocity) from the two branches' ``x - denoised``."""
        return guidance.guided_velocity(
            cond, uncond, cfg, cfg_formula=self.cfg_formula, renorm_mode=self.renorm_mode, renorm=self.renorm
        )


def _uses_sampling_function(guider) -> bool:
    # Guiders that override predict_noise (DualCFG, PerpNeg, ...) mix branches their own way: leave them be.
    import comfy.samplers

    return getattr(type(guider), "predict_noise", None) is comfy.samplers.CFGGuider.predict_noise


class StepReportWrapper:
    """``WrappersMP.SAMPLER_SAMPLE`` wrapper: one :class:`SamplerSteps` per sampling run, fed by the
    sampler's step callback (wrapped; the original still runs) and handed to the model calls in
    ``model_options``. KSAMPLER calls ``callback(i, denoised, x, total_steps)`` for step i."""

    def __call__(self, executor, guider, sigmas, extra_args, callback, *args, **kwargs):
        function = getattr(executor.class_obj, "sampler_function", None)
        steps = SamplerSteps(sigmas, END_POINT_SAMPLERS.get(getattr(function, "__name__", None)))

        def report(step, *rest):
            steps.step_reported(step)
            if callback is not None:
                return callback(step, *rest)

        model_options = {**extra_args.get("model_options", {}), STEPS_KEY: steps}
        return executor(
            guider, sigmas, {**extra_args, "model_options": model_options}, report, *args, **kwargs
        )


class PlanWrapper:
    """``WrappersMP.PREDICT_NOISE`` wrapper: decides the branches of this model call (see module doc)."""

    def __init__(self, settings: GuidanceSettings):
        self.settings = settings

    def __call__(self, executor, x, timestep, model_options=None, seed=None):
        guider = executor.class_obj
        model_options = {} if model_options is None else model_options
        if not _uses_sampling_function(guider):
            return executor(x, timestep, model_options, seed)
        sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        steps = model_options.get(STEPS_KEY)
        step = None if steps is None else steps.step_of_call(timestep)
        plan = self.settings.plan(timestep, sample_sigmas, guider.cfg, step=step)
        if plan != "cond" and not guider.conds.get("negative"):
            raise ValueError(
                f"negative: no negative conditioning, but this step needs the unconditional branch "
                f"(cfg {guider.cfg} with cfg_formula {self.settings.cfg_formula!r}, after_trunc "
                f"{self.settings.after_trunc!r}); connect a negative or use no guidance"
            )
        return executor(x, timestep, {**model_options, PLAN_KEY: plan}, seed)


def calc_planned_branches(args):
    """``sampler_calc_cond_batch_function``: evaluate only the branches the plan names.

    The skipped list is passed as None, so ``calc_cond_batch`` runs no forward pass for it and the
    evaluated one keeps its ``cond_or_uncond`` index (0 = cond, 1 = uncond) for caches of other nodes.
    """
    import comfy.samplers

    conds, x, sigma = args["conds"], args["input"], args["sigma"]
    model, model_options = args["model"], args["model_options"]
    plan = model_options.get(PLAN_KEY)
    if plan == "cond":
        out = comfy.samplers.calc_cond_batch(model, [conds[0], None], x, sigma, model_options)[0]
        return [out, out]
    if plan == "uncond":
        out = comfy.samplers.calc_cond_batch(model, [None, conds[1]], x, sigma, model_options)[1]
        return [out, out]
    return comfy.samplers.calc_cond_batch(model, conds, x, sigma, model_options)


class PlannedCFG:
    """``sampler_cfg_function``: returns ``x - denoised`` (ComfyUI subtracts it from x)."""

    def __init__(self, settings: GuidanceSettings):
        self.settings = settings

    def __call__(self, args):
        cond, uncond, cfg = args["cond"], args["uncond"], args["cond_scale"]
        plan = args["model_options"].get(PLAN_KEY)
        if plan is None:  # a guider with its own predict_noise: ComfyUI's plain CFG
            return uncond + (cond - uncond) * cfg
        if plan != "both":  # one branch was evaluated and sits in both slots
            return cond
        return self.settings.combine(cond, uncond, cfg)


def patch_model(model_patcher, settings: GuidanceSettings):
    """A clone of ``model_patcher`` whose sampling evaluates only the branches ``settings`` need.

    Replaces the clone's ``sampler_cfg_function`` and ``sampler_calc_cond_batch_function`` (ComfyUI has
    one slot each) and the wrappers of any earlier LTCFGPatch; wrappers and pre/post-CFG hooks of other
    nodes stay.
    """
    import comfy.patcher_extension

    settings.validate()
    patched = model_patcher.clone()
    wrappers = comfy.patcher_extension.WrappersMP
    for kind, wrapper in (
        (wrappers.SAMPLER_SAMPLE, StepReportWrapper()),
        (wrappers.PREDICT_NOISE, PlanWrapper(settings)),
    ):
        patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
        patched.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    patched.set_model_sampler_calc_cond_batch_function(calc_planned_branches)
    patched.set_model_sampler_cfg_function(PlannedCFG(settings), disable_cfg1_optimization=True)
    return patched


def make_guider(model_patcher, settings: GuidanceSettings, positive, negative, cfg: float):
    """A ComfyUI ``CFGGuider`` on a patched clone; ``negative`` may be None when no step needs it."""
    import comfy.samplers

    guidance.validate_cfg(cfg, settings.cfg_formula)
    if negative is None and settings.needs_negative(cfg):
        raise ValueError(
            f"negative: required unless there is no guidance (cfg {cfg} with cfg_formula "
            f"{settings.cfg_formula!r}) and no truncation to the 'uncond' branch"
        )
    guider = comfy.samplers.CFGGuider(patch_model(model_patcher, settings))
    conds = {"positive": positive} if negative is None else {"positive": positive, "negative": negative}
    guider.inner_set_conds(conds)
    guider.set_cfg(cfg)
    return guider
