"""LTLoraLoader (MODEL[, CLIP] -> MODEL, CLIP, report) and LTLoraConvert (any layout -> ComfyUI-native file).

Glue only: key layouts in models/lora_keys.py, checks and conversion in models/lora_convert.py,
applying with ComfyUI's machinery in models/lora_apply.py.
"""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from ..lora import apply as lora_apply
from . import paths
from .input_checks import checked_execution, checked_validation


def lora_files() -> list[str]:
    return folder_paths.get_filename_list("loras")


def check_lora_name(name) -> str | bool:
    if name is not None and name not in lora_files():
        return f"lora_name: {name!r} is not a file in models/loras/ ({len(lora_files())} available)"
    return True


class LTLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTLoraLoader",
            display_name="LoRA Loader (every Lumina / Z-Image layout)",
            category="LuminaTurbo/loaders",
            description=(
                "Loads Lumina-Image-2.0 and Z-Image LoRAs in every key layout in circulation: ComfyUI-native "
                "fused qkv, kohya lora_unet_, diffusers/PEFT (transformer. or bare, lora_A/lora_B), ai-toolkit, "
                "musubi-tuner raw, SimpleTuner / diffusers Lumina-2 names (attn.to_q, feed_forward.linear_1). "
                "Split q/k/v patch the right slices of the fused (grouped-query) qkv. Applied with ComfyUI's "
                "own LoRA machinery; keys it cannot map are reported (count and names), never ignored."
            ),
            inputs=[
                io.Model.Input(
                    "model", tooltip="The Lumina-2 / Z-Image model to patch (a clone is patched)."
                ),
                io.Combo.Input(
                    "lora_name",
                    options=lora_files(),
                    tooltip="A LoRA file from models/loras/, in any supported layout.",
                ),
                io.Float.Input(
                    "strength_model",
                    default=1.0,
                    min=-100.0,
                    max=100.0,
                    step=0.01,
                    tooltip="How strongly the LoRA changes the diffusion model (ComfyUI semantics; "
                    "0 = unchanged, negative inverts).",
                ),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="Optional text encoder, for LoRAs that also train it (lora_te_ / "
                    "text_encoder. keys).",
                ),
                io.Float.Input(
                    "strength_clip",
                    default=1.0,
                    min=-100.0,
                    max=100.0,
                    step=0.01,
                    tooltip="How strongly the LoRA changes the text encoder (only with clip).",
                ),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.String.Output("report")],
        )

    @classmethod
    @checked_validation
    def validate_inputs(cls, lora_name=None, **_):
        return check_lora_name(lora_name)

    @classmethod
    @checked_execution
    def execute(cls, model, lora_name, strength_model, strength_clip, clip=None) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        new_model, new_clip, report = lora_apply.apply_lora(model, clip, path, strength_model, strength_clip)
        text = report.text()
        return io.NodeOutput(new_model, new_clip, text, ui=ui.PreviewText(text))


class LTLoraConvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTLoraConvert",
            display_name="LoRA Convert to ComfyUI layout",
            category="LuminaTurbo/loaders",
            description=(
                "Writes a Lumina-2 / Z-Image LoRA of any supported layout into models/loras/ in ComfyUI-native "
                "layout (diffusion_model.<module>.lora_up/lora_down/alpha, split q/k/v fused into qkv), which "
                "ComfyUI's stock LoraLoader loads with no warning. Written to a temp file and renamed; refuses "
                "files with keys it cannot map and never overwrites unless asked."
            ),
            inputs=[
                io.Combo.Input(
                    "lora_name", options=lora_files(), tooltip="The LoRA file to convert (models/loras/)."
                ),
                io.String.Input(
                    "output_name",
                    default="",
                    tooltip="File name for the result in models/loras/ ('.safetensors' is added); "
                    "empty = '<input name>_comfy'.",
                ),
                io.Boolean.Input(
                    "overwrite",
                    default=False,
                    tooltip="Replace an existing file of that name (the input itself never).",
                ),
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="Optional: the model the LoRA is for, to size the q/k/v slices and check "
                    "every shape (needed when a LoRA patches only q of some attention).",
                ),
            ],
            outputs=[io.String.Output("path")],
            is_output_node=True,
        )

    @classmethod
    @checked_validation
    def validate_inputs(cls, lora_name=None, output_name=None, **_):
        if output_name:  # linked (None here): checked in execute
            try:
                paths.plain_file_name(output_name, "output_name")
            except paths.PathRefused as error:
                return str(error)
        return check_lora_name(lora_name)

    @staticmethod
    def paths(lora_name, output_name):
        """(input path, output path): the output goes next to the input, in the same loras folder.

        The output name is checked here, where it is used: a linked value never reached validate_inputs.
        """
        src = folder_paths.get_full_path_or_raise("loras", lora_name)
        name = (output_name or "").strip() or os.path.splitext(os.path.basename(lora_name))[0] + "_comfy"
        paths.plain_file_name(name, "output_name")
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        return src, os.path.join(os.path.dirname(src), name)

    @classmethod
    def fingerprint_inputs(cls, lora_name=None, output_name=None, **_):
        # re-run when either file changed (ComfyUI would otherwise skip a repeated prompt)
        try:
            return tuple(
                os.path.getmtime(p) if os.path.exists(p) else None for p in cls.paths(lora_name, output_name)
            )
        except Exception:  # an unknown lora_name: validation reports it
            return None

    @classmethod
    @checked_execution
    def execute(cls, lora_name, output_name, overwrite, model=None) -> io.NodeOutput:
        src, dst = cls.paths(lora_name, output_name)
        paths.model_folder_file("loras", dst, "output_name")  # a symlinked sub-folder must not carry it out
        if os.path.exists(dst) and not overwrite:
            raise ValueError(f"output_name: {dst} exists; choose another name or set overwrite")
        shapes = None
        if model is not None:
            if not lora_apply.is_nextdit(model):
                raise ValueError("model: expected a Lumina-Image-2.0 / Z-Image (NextDiT) model")
            shapes = lora_apply.target_shapes(model)
        summary = lora_apply.convert_file(src, dst, shapes)
        text = (
            f"wrote {summary['path']} ({summary['keys_in']} keys in, {summary['keys_out']} out; "
            f"layout was: {', '.join(summary['layouts'])})"
        )
        return io.NodeOutput(summary["path"], ui=ui.PreviewText(text))


NODES = [LTLoraLoader, LTLoraConvert]
