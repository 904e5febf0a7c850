"""LTContextDrop and LTScaledRoPE (MODEL -> MODEL): NextDiT patches for speed and resolution extrapolation.

Glue only: the hooks are in models/context_drop.py and models/scaled_rope.py, the frequency math in
models/rope_scaling.py.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..lora.apply import is_nextdit
from ..patches import context_drop, scaled_rope
from ..samplers import rope_scaling
from .input_checks import checked_execution, checked_validation

CONTEXT_DEFAULTS = context_drop.ContextDropSettings()


def require_nextdit(model, node):
    if not is_nextdit(model):
        raise ValueError(
            f"model: {node} expects a Lumina-Image-2.0 / Z-Image (NextDiT) model, got "
            f"{type(getattr(model, 'model', model)).__name__}"
        )


class LTContextDrop(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTContextDrop",
            display_name="Time-Aware Context Drop (NextDiT)",
            category="LuminaTurbo/model_patches",
            description=(
                "Lumina-Next's Time-Aware Context Drop for Lumina-2 / Z-Image: in attention the image keys and "
                "values are average-pooled over kernel x kernel token windows while every query is kept, so "
                "high-resolution forwards get cheaper. Full strength at the noise end, none at and below "
                "end_sigma (0.3 by default: the last steps are bit-identical to the unpatched model); caption "
                "tokens are never pooled. Falls back to exact attention "
                "(logged once) where the layout is not the expected one."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A Lumina-2 / Z-Image model (a clone is patched)."),
                io.Int.Input(
                    "kernel",
                    default=CONTEXT_DEFAULTS.kernel,
                    min=1,
                    max=8,
                    tooltip="Pooling window in tokens per side: 2 keeps 1/4 of the image keys/values, "
                    "3 keeps 1/9. 1 = off (the model is returned unchanged).",
                ),
                io.Float.Input(
                    "start_sigma",
                    default=CONTEXT_DEFAULTS.start_sigma,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="At and above this sigma (1 = pure noise) every selected layer drops.",
                ),
                io.Float.Input(
                    "end_sigma",
                    default=CONTEXT_DEFAULTS.end_sigma,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="At and below this sigma no layer drops (exact model). 0.3 makes the last step "
                    "of the usual Lumina-2 / Z-Image schedules exact (samplers never reach sigma 0). In "
                    "between, the dropping fraction of the selected layers falls linearly.",
                ),
                io.String.Input(
                    "layers",
                    default="all",
                    tooltip="Main transformer layers that may drop: 'all' or indices like '0-9, 20'. "
                    "The refiner blocks always stay exact.",
                ),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    @checked_validation
    def validate_inputs(cls, kernel=None, start_sigma=None, end_sigma=None, layers=None, **_):
        try:
            if None not in (kernel, start_sigma, end_sigma):
                context_drop.ContextDropSettings(kernel, start_sigma, end_sigma)
            if layers is not None:
                context_drop.parse_layers(layers)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    @checked_execution
    def execute(cls, model, kernel, start_sigma, end_sigma, layers) -> io.NodeOutput:
        require_nextdit(model, "LTContextDrop")
        chosen = context_drop.parse_layers(layers)
        context_drop.check_layers(chosen, len(model.get_model_object("diffusion_model").layers))
        settings = context_drop.ContextDropSettings(kernel, start_sigma, end_sigma, chosen)
        return io.NodeOutput(context_drop.apply_context_drop(model, settings))


class LTScaledRoPE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTScaledRoPE",
            display_name="Scaled RoPE (resolution extrapolation)",
            category="LuminaTurbo/model_patches",
            description=(
                "Resolution extrapolation for Lumina-2 / Z-Image: rescales the image-axis RoPE frequencies when "
                "the picture is larger than the training resolution (PI, NTK-aware, or Lumina-Next's "
                "Frequency-Aware / Time-Aware Scaled RoPE). At or below the training resolution the model is "
                "bit-identical. Composes with ComfyUI's ScaleROPE."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A Lumina-2 / Z-Image model (a clone is patched)."),
                io.Combo.Input(
                    "mode",
                    options=list(rope_scaling.MODES),
                    default="time_aware",
                    tooltip="none: off. pi: positions / s (blurry but coherent). ntk: NTK-aware base "
                    "(sharp, may repeat content). frequency_aware: NTK for wavelengths shorter "
                    "than the training size, PI beyond. time_aware: PI-like early (global "
                    "layout), NTK-like late (detail) -- Lumina-Next's default for 2K.",
                ),
                io.Int.Input(
                    "train_resolution",
                    default=1024,
                    min=16,  # one 16-pixel patch (2x2 latent): the smallest grid a NextDiT has
                    max=16384,
                    step=16,
                    tooltip="The resolution (pixels per side) the model was trained at; Lumina-2 and "
                    "Z-Image: 1024. The scale per axis is image size / this.",
                ),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    @checked_validation
    def validate_inputs(cls, mode=None, train_resolution=None, **_):
        if mode is not None and mode not in rope_scaling.MODES:
            return f"mode: expected one of {list(rope_scaling.MODES)}, got {mode!r}"
        return True

    @classmethod
    @checked_execution
    def execute(cls, model, mode, train_resolution) -> io.NodeOutput:
        require_nextdit(model, "LTScaledRoPE")
        return io.NodeOutput(scaled_rope.apply_scaled_rope(model, mode, train_resolution))


NODES = [LTContextDrop, LTScaledRoPE]
