"""LTModelLoader: diffusers folders and single files of Lumina-Image-2.0 / Z-Image, any size."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..models import loading

FROM_FOLDER = "(from the diffusers folder)"


def diffusers_folders() -> list[str]:
    """Sub-folders of models/diffusers/ that hold a diffusers transformer."""
    found = set()
    for root in folder_paths.get_folder_paths("diffusers"):
        if os.path.isdir(root):
            found.update(name for name in os.listdir(root) if loading.is_diffusers_folder(os.path.join(root, name)))
    return sorted(found)


def diffusers_folder_path(name: str) -> str | None:
    for root in folder_paths.get_folder_paths("diffusers"):
        path = os.path.join(root, name)
        if loading.is_diffusers_folder(path):
            return path
    return None


def loader_choices() -> dict[str, list[str]]:
    """What each combo of LTModelLoader offers right now (files appear without a restart)."""
    return {
        "model": diffusers_folders() + folder_paths.get_filename_list("diffusion_models"),
        "text_encoder": [FROM_FOLDER] + folder_paths.get_filename_list("text_encoders"),
        "vae": [FROM_FOLDER] + folder_paths.get_filename_list("vae"),
        "weight_dtype": list(loading.DTYPES),
    }


class LTModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        choices = loader_choices()
        return io.Schema(
            node_id="LTModelLoader",
            display_name="Lumina / Z-Image Loader",
            category="LuminaTurbo/loaders",
            description=(
                "Loads Lumina-Image-2.0, Z-Image or Z-Image-Turbo at any size: a diffusers folder from "
                "models/diffusers/ (transformer, text encoder, tokenizer and VAE together) or a single "
                "transformer file from models/diffusion_models/ with separate text-encoder and VAE files. "
                "The architecture is read from the files, not guessed."
            ),
            inputs=[
                io.Combo.Input("model", options=choices["model"],
                               tooltip="A diffusers folder (models/diffusers/) or a transformer file (models/diffusion_models/)."),
                io.Combo.Input("text_encoder", options=choices["text_encoder"],
                               default=FROM_FOLDER,
                               tooltip="Gemma-2 (Lumina-2) or Qwen3 (Z-Image) file from models/text_encoders/, "
                                       "or the diffusers folder's own text_encoder/ + tokenizer/."),
                io.Combo.Input("vae", options=choices["vae"], default=FROM_FOLDER,
                               tooltip="The 16-channel Flux-style VAE from models/vae/, or the diffusers folder's vae/."),
                io.Combo.Input("weight_dtype", options=choices["weight_dtype"], default="default",
                               tooltip="Transformer weight dtype; 'default' keeps what the files hold."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def validate_inputs(cls, model, text_encoder, vae, weight_dtype):
        # ComfyUI 0.3.75 does not check V3 combo values itself: refuse unknown names before queueing.
        values = {"model": model, "text_encoder": text_encoder, "vae": vae, "weight_dtype": weight_dtype}
        for name, options in loader_choices().items():
            if values[name] not in options:
                value = values[name]
                return f"{name}: {value!r} is not one of the {len(options)} available choices"
        return True

    @classmethod
    def execute(cls, model, text_encoder, vae, weight_dtype) -> io.NodeOutput:
        dtype = loading.DTYPES[weight_dtype]
        folder = diffusers_folder_path(model)
        if folder is None and (text_encoder == FROM_FOLDER or vae == FROM_FOLDER):
            raise ValueError(f"model: {model!r} is a single transformer file, so text_encoder and vae must name "
                             f"files (models/text_encoders/, models/vae/), not {FROM_FOLDER!r}")
        if folder is not None:
            diffusion_model = loading.load_transformer_folder(folder, dtype)
        else:
            diffusion_model = loading.load_transformer_file(folder_paths.get_full_path_or_raise("diffusion_models", model), dtype)
        if text_encoder == FROM_FOLDER:
            clip = loading.clip_from_diffusers_folder(folder)
        else:
            clip = loading.load_text_encoder_file(folder_paths.get_full_path_or_raise("text_encoders", text_encoder))
        if vae == FROM_FOLDER:
            vae_model = loading.vae_from_diffusers_folder(folder)
        else:
            vae_model = loading.load_vae_file(folder_paths.get_full_path_or_raise("vae", vae))
        return io.NodeOutput(diffusion_model, clip, vae_model)
NODES = [LTModelLoader]
