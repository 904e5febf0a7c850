"""LTModelLoader: diffusers folders and single files of Lumina-Image-2.0 / Z-Image, any size."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..loading import fp8, model_files
from ..loading.errors import ModelFileError
from ..loading.safetensors_io import read_header
from .input_checks import checked_execution, checked_validation

FROM_FOLDER = "(from the diffusers folder)"


def _diffusers_roots() -> list[str]:
    return [root for root in folder_paths.get_folder_paths("diffusers") if os.path.isdir(root)]


def diffusers_folders() -> list[str]:
    """Sub-folders of models/diffusers/ whose transformer is Lumina-Image-2.0 or Z-Image."""
    found = set()
    for root in _diffusers_roots():
        for name in os.listdir(root):
            try:
                model_files.transformer_config(os.path.join(root, name))
                found.add(name)
            except ModelFileError:
                pass  # another model, or a broken one: validate_inputs explains it if it is chosen
    return sorted(found)


def diffusers_folder_path(name: str) -> str | None:
    """The folder under models/diffusers/ called ``name`` (the first root that has it)."""
    if name in ("", ".", "..") or os.path.basename(name) != name:
        return None  # only direct sub-folders are offered; never look outside models/diffusers/
    for root in _diffusers_roots():
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    return None


def loader_choices() -> dict[str, list[str]]:
    """What each combo of LTModelLoader offers right now (files appear without a restart)."""
    return {
        "model": diffusers_folders() + folder_paths.get_filename_list("diffusion_models"),
        "text_encoder": [FROM_FOLDER] + folder_paths.get_filename_list("text_encoders"),
        "vae": [FROM_FOLDER] + folder_paths.get_filename_list("vae"),
        "weight_dtype": list(model_files.DTYPES),
    }


def _choice_error(values: dict) -> str | None:
    for name, options in loader_choices().items():
        if values[name] not in options:
            return f"{name}: {values[name]!r} is not one of the {len(options)} available choices"
    return None


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
                io.Combo.Input(
                    "model",
                    options=choices["model"],
                    tooltip="A diffusers folder (models/diffusers/) or a transformer file (models/diffusion_models/).",
                ),
                io.Combo.Input(
                    "text_encoder",
                    options=choices["text_encoder"],
                    default=FROM_FOLDER,
                    tooltip="Gemma-2 (Lumina-2) or Qwen3 (Z-Image) file from models/text_encoders/, "
                    "or the diffusers folder's own text_encoder/ + tokenizer/.",
                ),
                io.Combo.Input(
                    "vae",
                    options=choices["vae"],
                    default=FROM_FOLDER,
                    tooltip="The 16-channel Flux-style VAE from models/vae/, or the diffusers folder's vae/.",
                ),
                io.Combo.Input(
                    "weight_dtype",
                    options=choices["weight_dtype"],
                    default="default",
                    tooltip="Transformer weight dtype; 'default' keeps what the files hold. fp8_* store the "
                    "weights in fp8 (half of bf16's memory) and compute in the GPU's dtype, as UNETLoader does; "
                    "_fast also multiplies in fp8 where the GPU can. Pre-quantized scaled-fp8 files load as "
                    "they are with 'default'.",
                ),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    @checked_validation
    def validate_inputs(cls, model, text_encoder, vae, weight_dtype):
        # ComfyUI 0.3.75 does not check V3 combo values itself: refuse unknown names before queueing,
        # and run the cheap file checks (headers, shard lists, tokenizer files) before any loading.
        values = {"model": model, "text_encoder": text_encoder, "vae": vae, "weight_dtype": weight_dtype}
        if None in values.values():
            return True  # linked (None here): execute checks the names against the same lists
        folder = diffusers_folder_path(model)
        try:
            if folder is not None:
                parts = ["transformer"] + [
                    name
                    for name, value in (("text_encoder", text_encoder), ("vae", vae))
                    if value == FROM_FOLDER
                ]
                model_files.check_diffusers_folder(folder, parts)
            elif FROM_FOLDER in (text_encoder, vae) and model in folder_paths.get_filename_list(
                "diffusion_models"
            ):
                return (
                    f"model: {model!r} is a single transformer file, so text_encoder and vae must name files "
                    f"(models/text_encoders/, models/vae/), not {FROM_FOLDER!r}"
                )
            files = [("text_encoders", text_encoder), ("vae", vae)]
            if folder is None:
                files.append(("diffusion_models", model))
            if folder is None and folder_paths.get_full_path("diffusion_models", model) is None:
                return _choice_error(values)  # neither a folder nor a file: nothing below could be checked
            paths = {}
            for kind, name in files:
                paths[kind] = folder_paths.get_full_path(kind, name) if name != FROM_FOLDER else None
                if paths[kind] is not None:
                    read_header(paths[kind])  # a truncated or corrupt file is refused before anything loads
            # the pair is checked from the headers: a wrong family or width would only fail deep in torch
            transformer = os.path.join(folder, "transformer") if folder else paths.get("diffusion_models")
            encoder = (
                os.path.join(folder, "text_encoder")
                if text_encoder == FROM_FOLDER
                else paths["text_encoders"]
            )
            if transformer is not None and encoder is not None:
                model_files.check_pairing(transformer, encoder)
            if folder is None and paths.get("diffusion_models") is not None:
                model_files.check_scaled_fp8_header(paths["diffusion_models"])
        except ModelFileError as error:
            return str(error)
        problem = fp8.choice_problem(weight_dtype)
        if problem:
            return f"weight_dtype: {problem}"
        return _choice_error(values) or True

    @classmethod
    @checked_execution
    def execute(cls, model, text_encoder, vae, weight_dtype) -> io.NodeOutput:
        options = model_files.weight_dtype_options(weight_dtype)
        folder = diffusers_folder_path(model)
        if folder is not None:
            diffusion_model = model_files.load_transformer_folder(folder, **options)
        else:
            path = folder_paths.get_full_path_or_raise("diffusion_models", model)
            diffusion_model = model_files.load_transformer_file(path, **options)
        if text_encoder == FROM_FOLDER:
            clip = model_files.clip_from_diffusers_folder(folder)
        else:
            clip = model_files.load_text_encoder_file(
                folder_paths.get_full_path_or_raise("text_encoders", text_encoder)
            )
        if vae == FROM_FOLDER:
            vae_model = model_files.vae_from_diffusers_folder(folder)
        else:
            vae_model = model_files.load_vae_file(folder_paths.get_full_path_or_raise("vae", vae))
        return io.NodeOutput(diffusion_model, clip, vae_model)


NODES = [LTModelLoader]
