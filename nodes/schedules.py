"""LTSigmoidScheduler, LTAnchorScheduler (SIGMAS + a plot IMAGE) and LTFlowMidpointSampler (SAMPLER).

Node glue only: the schedules are samplers/schedules.py, the solver samplers/flow_solvers.py, the
model-shift lookup models/sampling_shift.py, the plot nodes/sigma_plot.py. Importing this module also
adds ``lt_sigmoid``, ``lt_anchor`` and ``flow_midpoint`` to ComfyUI's stock lists (nodes/stock_lists.py).
Input names (steps, shift, convention, denoise, slope, center) are read by the web preview
(nodes/web_routes.py, web/js/sigma_preview.js): keep them stable.
"""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..patches.sampling_shift import describe_shift, sigmas_for_model
from ..samplers.flow_solvers import FINAL_STEPS, sample_flow_midpoint
from ..samplers.schedules import (
    ANCHOR_CONVENTIONS,
    SIGMOID_DEFAULT_CENTER,
    SIGMOID_DEFAULT_SLOPE,
    anchor_sigmas,
    sigmoid_sigmas,
)
from .input_checks import checked_execution, checked_validation
from .sigma_plot import sigma_plot

# Widget limits; validate_inputs enforces them too (ComfyUI skips its own min/max check for inputs
# a node validates itself).
LIMITS = {
    "steps": (1, 10000),
    "slope": (0.0, 20.0),
    "center": (0.0, 1.0),
    "shift": (0.01, 100.0),
    "denoise": (0.0, 1.0),
}

_STEPS_TIP = (
    "Number of sampling intervals (sigmas = steps + 1, ending at 0). Same meaning as BasicScheduler's steps."
)
_DENOISE_TIP = (
    "Like BasicScheduler: below 1, a schedule of int(steps / denoise) steps is built and its last "
    "steps + 1 sigmas are kept (img2img). 0 gives an empty schedule."
)
_PLOT_TIP = "The schedule drawn as sigma (1 = noise) against step; connect to PreviewImage or SaveImage."


def _check_inputs(values: dict, build) -> bool | str:
    """True, or an error naming the input. Linked inputs arrive as None and are checked in execute."""
    if any(value is None for value in values.values()):
        return True
    for name, value in values.items():
        if name in LIMITS and isinstance(value, int | float):
            low, high = LIMITS[name]
            if not low <= value <= high:
                return f"{name} must be between {low} and {high}, got {value!r}"
    try:
        build()
    except ValueError as err:
        return str(err)
    return True


class LTSigmoidScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTSigmoidScheduler",
            display_name="Sigmoid Scheduler (Lumina-Next)",
            category="LuminaTurbo/sampling",
            description=(
                "Lumina-Next style sigmoid time discretisation for flow models: small steps at both ends "
                "(near noise and near data), large ones in the middle, exact endpoints 1 -> 0. "
                "sigma_i = (L(slope*(center - i/steps)) - L(slope*(center - 1))) / (L(slope*center) - "
                "L(slope*(center - 1))), L the logistic; slope 0 is uniform. With a model connected its "
                "own time shift is applied afterwards. Also outputs a plot of the curve."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="Optional flow model: its time shift (model_sampling.shift, e.g. 6 for "
                    "Lumina-2, 3 for Z-Image, or what ModelSamplingAuraFlow/SD3 set) is "
                    "applied to the schedule. Without it the schedule is unshifted.",
                ),
                io.Int.Input(
                    "steps", default=10, min=LIMITS["steps"][0], max=LIMITS["steps"][1], tooltip=_STEPS_TIP
                ),
                io.Float.Input(
                    "slope",
                    default=SIGMOID_DEFAULT_SLOPE,
                    min=LIMITS["slope"][0],
                    max=LIMITS["slope"][1],
                    step=0.1,
                    tooltip="Steepness of the logistic: 0 = uniform steps, larger = more steps at both "
                    "ends. Default 2: the best average on the exact-flow sweep (README, Schedules); "
                    "slopes 3-4 starve the middle and are worse.",
                ),
                io.Float.Input(
                    "center",
                    default=SIGMOID_DEFAULT_CENTER,
                    min=LIMITS["center"][0],
                    max=LIMITS["center"][1],
                    step=0.01,
                    tooltip="Step fraction where steps are largest. 0.5 = symmetric; smaller puts the large "
                    "steps earlier (more small steps near the data end).",
                ),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=LIMITS["denoise"][0],
                    max=LIMITS["denoise"][1],
                    step=0.01,
                    tooltip=_DENOISE_TIP,
                ),
            ],
            outputs=[
                io.Sigmas.Output(display_name="sigmas"),
                io.Image.Output(display_name="plot", tooltip=_PLOT_TIP),
            ],
        )

    @classmethod
    @checked_validation
    def validate_inputs(cls, steps, slope, center, denoise):
        values = {"steps": steps, "slope": slope, "center": center, "denoise": denoise}
        return _check_inputs(
            values, lambda: sigmoid_sigmas(steps, slope=slope, center=center, denoise=denoise)
        )

    @classmethod
    @checked_execution
    def execute(cls, steps, slope, center, denoise, model=None) -> io.NodeOutput:
        def build(shift):
            return sigmoid_sigmas(steps, slope=slope, center=center, shift=shift, denoise=denoise)

        if model is None:
            sigmas, shift_text = build(None), "no shift"
        else:
            model_sampling = model.get_model_object("model_sampling")
            sigmas, shift_text = sigmas_for_model(model_sampling, build), describe_shift(model_sampling)
        title = f"LTSigmoidScheduler · {steps} steps · slope {slope:g} · center {center:g} · {shift_text}"
        if denoise < 1.0:
            title += f" · denoise {denoise:g}"
        return io.NodeOutput(sigmas, sigma_plot(sigmas, title))


class LTAnchorScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTAnchorScheduler",
            display_name="Anchor Scheduler (Z-Image / AC-RF)",
            category="LuminaTurbo/sampling",
            description=(
                "The exact sigmas a Turbo model or an AC-RF LoRA was trained on. zimage: "
                "sigma = shift(linspace(1, 0, steps + 1)) with the rational shift "
                "shift*s / (1 + (shift - 1)*s), the official Z-Image / Lumina schedule (Z-Image-Turbo: "
                "8 steps, shift 3). diffusers: FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps)"
                ".sigmas, its sigma_min quirk included. Also outputs a plot of the curve."
            ),
            inputs=[
                io.Int.Input(
                    "steps",
                    default=8,
                    min=LIMITS["steps"][0],
                    max=LIMITS["steps"][1],
                    tooltip=_STEPS_TIP
                    + " Use the step count the model/LoRA was trained for (8 for Z-Image-Turbo).",
                ),
                io.Float.Input(
                    "shift",
                    default=3.0,
                    min=LIMITS["shift"][0],
                    max=LIMITS["shift"][1],
                    step=0.01,
                    tooltip="Rational time shift (> 0; 1 = none, larger = more steps near the noise end): "
                    "3 for Z-Image-Turbo, 6 for Lumina-Image-2.0, or what the LoRA was trained with.",
                ),
                io.Combo.Input(
                    "convention",
                    options=list(ANCHOR_CONVENTIONS),
                    default="zimage",
                    tooltip="zimage: shift(linspace(1, 0, steps + 1)), official Z-Image/Lumina. diffusers: "
                    "exactly FlowMatchEulerDiscreteScheduler's sigmas (spaced to its shifted "
                    "sigma_min, then shifted again; interior sigmas slightly lower).",
                ),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=LIMITS["denoise"][0],
                    max=LIMITS["denoise"][1],
                    step=0.01,
                    tooltip=_DENOISE_TIP,
                ),
            ],
            outputs=[
                io.Sigmas.Output(display_name="sigmas"),
                io.Image.Output(display_name="plot", tooltip=_PLOT_TIP),
            ],
        )

    @classmethod
    @checked_validation
    def validate_inputs(cls, steps, shift, convention, denoise):
        values = {"steps": steps, "shift": shift, "convention": convention, "denoise": denoise}
        return _check_inputs(
            values, lambda: anchor_sigmas(steps, shift, convention=convention, denoise=denoise)
        )

    @classmethod
    @checked_execution
    def execute(cls, steps, shift, convention, denoise) -> io.NodeOutput:
        sigmas = anchor_sigmas(steps, shift, convention=convention, denoise=denoise)
        title = f"LTAnchorScheduler · {steps} steps · shift {shift:g} · {convention}"
        if denoise < 1.0:
            title += f" · denoise {denoise:g}"
        return io.NodeOutput(sigmas, sigma_plot(sigmas, title))


class LTFlowMidpointSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTFlowMidpointSampler",
            display_name="Flow Midpoint Sampler",
            category="LuminaTurbo/sampling",
            description=(
                "Second-order explicit midpoint solver for the flow ODE dx/dsigma = v (the official Lumina "
                "sampler): 2 model calls per interval, the model is never evaluated at sigma 0. For "
                "SamplerCustomAdvanced; the stock KSampler lists it as flow_midpoint. Previews and the "
                "progress bar update once per interval."
            ),
            inputs=[
                io.Combo.Input(
                    "final_step",
                    options=list(FINAL_STEPS),
                    default="midpoint",
                    tooltip="How the last interval (to sigma 0) is taken. midpoint: 2 calls, like every "
                    "other interval (default; more accurate, README). euler: 1 "
                    "call, x = denoised (saves one model call).",
                ),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    @checked_validation
    def validate_inputs(cls, final_step):
        if final_step is not None and final_step not in FINAL_STEPS:
            return f"final_step must be one of {list(FINAL_STEPS)}, got {final_step!r}"
        return True

    @classmethod
    @checked_execution
    def execute(cls, final_step) -> io.NodeOutput:
        return io.NodeOutput(
            comfy.samplers.KSAMPLER(sample_flow_midpoint, extra_options={"final_step": final_step})
        )


NODES = [LTSigmoidScheduler, LTAnchorScheduler, LTFlowMidpointSampler]
