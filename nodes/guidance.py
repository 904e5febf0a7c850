"""LTCFGGuider (GUIDER) and LTCFGPatch (MODEL -> MODEL): CFG truncation and renorm that skip real compute.

Glue only: the math is in samplers/guidance.py, the ComfyUI hooks in models/guidance_hooks.py.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..patches.guidance_hooks import AFTER_TRUNC, GuidanceSettings, make_guider, patch_model
from ..samplers import guidance
from .input_checks import checked_execution, checked_validation

DEFAULTS = GuidanceSettings()
SETTING_NAMES = ("renorm", "renorm_mode", "trunc_mode", "trunc", "after_trunc", "cfg_formula")


def option_inputs(cfg_meaning: str) -> list:
    """The inputs both nodes share, after model/conditioning/cfg."""
    return [
        io.Float.Input(
            "renorm",
            default=DEFAULTS.renorm,
            min=0.0,
            max=100.0,
            step=0.01,
            tooltip="Renorm factor for renorm_mode 'cap': the guided prediction's norm is capped at "
            "renorm x the conditional one's, per sample (official Lumina-2 renorm_cfg, "
            "Z-Image cfg_normalization). 0 = off. Unused by 'off' and 'rescale_lastdim'.",
        ),
        io.Combo.Input(
            "renorm_mode",
            options=list(guidance.RENORM_MODES),
            default=DEFAULTS.renorm_mode,
            tooltip="'cap': official Lumina-2 / Z-Image, never scales up. 'rescale_lastdim': "
            "diffusers Lumina2Pipeline cfg_normalization (rescales each latent row to the "
            "conditional norm, can scale up). 'off': plain CFG.",
        ),
        io.Combo.Input(
            "trunc_mode",
            options=list(guidance.TRUNCATION_MODES),
            default=DEFAULTS.trunc_mode,
            tooltip="When CFG stops; afterwards ONE branch is evaluated per model call (the other "
            "forward pass is skipped). 'step_fraction': diffusers cfg_trunc_ratio, CFG while "
            "(step+1)/steps <= trunc. 'lumina_t': official cfg_trunc, CFG while 1 - sigma < "
            "trunc. 'zimage': Z-Image cfg_truncation, CFG while 1 - sigma_step <= trunc. "
            "'sigma': CFG while sigma >= trunc. 'last_steps': no CFG on the last trunc steps.",
        ),
        io.Float.Input(
            "trunc",
            default=DEFAULTS.trunc,
            min=0.0,
            max=10000.0,
            step=0.01,
            tooltip="The trunc_mode's value: step_fraction and sigma in [0, 1]; lumina_t and zimage "
            ">= 0 (>= 1 never truncates); last_steps a whole number of steps. Unused when off.",
        ),
        io.Combo.Input(
            "after_trunc",
            options=list(AFTER_TRUNC),
            default=DEFAULTS.after_trunc,
            tooltip="The branch evaluated after truncation: 'cond' (every official source) or "
            "'uncond' (the Wan 2.x cfg_truncate_steps recipe).",
        ),
        io.Combo.Input(
            "cfg_formula",
            options=list(guidance.CFG_FORMULAS),
            default=DEFAULTS.cfg_formula,
            tooltip=f"How {cfg_meaning} is read. 'comfy': uncond + cfg x (cond - uncond), 1 = no "
            "guidance (ComfyUI, Lumina-2). 'zimage': cond + cfg x (cond - uncond), 0 = no "
            "guidance (Z-Image guidance_scale; equals comfy cfg + 1).",
        ),
    ]


def settings_from(values: dict) -> GuidanceSettings:
    return GuidanceSettings(**{name: values[name] for name in SETTING_NAMES})


# validate_inputs default for `negative`: during validation ComfyUI passes a linked input as None and leaves
# an unconnected optional one out, so this sentinel means "not connected".
UNCONNECTED = object()


def validation_error(values: dict, cfg=None, negative=None) -> str | bool:
    """``validate_inputs`` result: True or a message naming the input. Values that arrive by link are None
    during validation and are skipped; execute checks everything again."""
    known = {k: v for k, v in values.items() if v is not None}
    try:
        if cfg is not None and "cfg_formula" in known:
            guidance.validate_cfg(cfg, known["cfg_formula"])
        if not all(name in known for name in SETTING_NAMES):
            return True
        settings = settings_from(known).validate()
        if cfg is not None and negative is UNCONNECTED and settings.needs_negative(cfg):
            return (
                f"negative: not connected, but cfg {cfg} ({settings.cfg_formula} formula) guides or "
                "after_trunc is 'uncond'; connect a negative, or use no guidance (cfg 1 for comfy, "
                "0 for zimage) with after_trunc 'cond'"
            )
    except ValueError as error:
        return str(error)
    return True


class LTCFGGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTCFGGuider",
            display_name="CFG Guider (truncation + renorm)",
            category="LuminaTurbo/guidance",
            description=(
                "A GUIDER for SamplerCustomAdvanced: classifier-free guidance with the Lumina-2 / Z-Image "
                "renorm and CFG truncation. After truncation, and everywhere at cfg 1 (Z-Image: 0), only one "
                "branch is evaluated per model call: the other forward pass is really skipped. Per-sample "
                "renorm, batch-safe; works with every sampler and any flow model."
            ),
            inputs=[
                io.Model.Input(
                    "model", tooltip="The diffusion model (any ComfyUI model; made for Lumina-2 / Z-Image)."
                ),
                io.Conditioning.Input("positive", tooltip="The conditional prompt."),
                io.Conditioning.Input(
                    "negative",
                    optional=True,
                    tooltip="The unconditional prompt. May stay unconnected when nothing "
                    "guides (cfg 1 comfy / 0 zimage), e.g. Z-Image-Turbo.",
                ),
                io.Float.Input(
                    "cfg",
                    default=4.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Guidance scale, read by cfg_formula (comfy: 1 = none, Lumina-2 uses 4; "
                    "zimage: 0 = none).",
                ),
                *option_inputs("cfg"),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    @checked_validation
    def validate_inputs(
        cls, cfg, renorm, renorm_mode, trunc_mode, trunc, after_trunc, cfg_formula, negative=UNCONNECTED
    ):
        values = dict(
            renorm=renorm,
            renorm_mode=renorm_mode,
            trunc_mode=trunc_mode,
            trunc=trunc,
            after_trunc=after_trunc,
            cfg_formula=cfg_formula,
        )
        return validation_error(values, cfg, negative)

    @classmethod
    @checked_execution
    def execute(
        cls,
        model,
        positive,
        cfg,
        renorm,
        renorm_mode,
        trunc_mode,
        trunc,
        after_trunc,
        cfg_formula,
        negative=None,
    ) -> io.NodeOutput:
        settings = GuidanceSettings(
            renorm, renorm_mode, trunc_mode, trunc, after_trunc, cfg_formula
        ).validate()
        return io.NodeOutput(make_guider(model, settings, positive, negative, cfg))


class LTCFGPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTCFGPatch",
            display_name="CFG Truncation + Renorm (model patch)",
            category="LuminaTurbo/guidance",
            description=(
                "The LTCFGGuider options as a MODEL patch for the stock KSampler (which keeps its own cfg). "
                "After truncation, and everywhere at no guidance, one branch is evaluated per model call: the "
                "other forward pass is skipped. Replaces ComfyUI's RenormCFG, which computes both branches, "
                "truncates in the wrong direction and fails for batch > 1."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (a clone is patched)."),
                *option_inputs("the KSampler's cfg"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    @checked_validation
    def validate_inputs(cls, renorm, renorm_mode, trunc_mode, trunc, after_trunc, cfg_formula):
        values = dict(
            renorm=renorm,
            renorm_mode=renorm_mode,
            trunc_mode=trunc_mode,
            trunc=trunc,
            after_trunc=after_trunc,
            cfg_formula=cfg_formula,
        )
        return validation_error(values)

    @classmethod
    @checked_execution
    def execute(
        cls, model, renorm, renorm_mode, trunc_mode, trunc, after_trunc, cfg_formula
    ) -> io.NodeOutput:
        settings = GuidanceSettings(renorm, renorm_mode, trunc_mode, trunc, after_trunc, cfg_formula)
        return io.NodeOutput(patch_model(model, settings))


NODES = [LTCFGGuider, LTCFGPatch]
