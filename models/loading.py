"""Open the files people have: a diffusers folder, or single files, of Lumina-Image-2.0 / Z-Image.

Returns ComfyUI objects (ModelPatcher, CLIP, VAE) built with ComfyUI's own classes, sized from the
files (config.json or tensor shapes), so tiny, pruned and future sizes load as well as the
released ones. Transformer tensors are read straight into the dtype they will have in the model,
so the weights are held once (see ``safetensors_io``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import nextdit_build, nextdit_keys
from .errors import ModelFileError
from .safetensors_io import (
    folder_tensor_infos,
    load_folder_state_dict,
    load_safetensors,
    majority_float_dtype,
    read_header,
)
from .text_encoders import check_tokenizer, clip_from_diffusers_folder, clip_from_state_dict
from .vae import vae_from_diffusers_folder, vae_from_state_dict

DTYPES = {"default": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRANSFORMER_CLASSES = ("Lumina2Transformer2DModel", "ZImageTransformer2DModel")
PIPELINE_CLASSES = ("Lumina2Pipeline", "Lumina2Text2ImgPipeline", "ZImagePipeline")
# Prefixes that all-in-one checkpoints put in front of the transformer keys.
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")


def _read_json(path: Path, expected: str) -> dict:
    if not path.is_file():
        raise ModelFileError(path, expected, "it does not exist")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(path, expected, f"not valid JSON: {exc}") from exc


def transformer_config(folder: str | Path) -> dict:
    """The ``transformer/config.json`` of a diffusers folder, checked to be Lumina-2 or Z-Image."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if index_path.is_file():
        pipeline = _read_json(index_path, "a diffusers model_index.json").get("_class_name")
        if pipeline not in PIPELINE_CLASSES:
            raise ModelFileError(
                index_path,
                f"a Lumina-Image-2.0 or Z-Image pipeline ({', '.join(PIPELINE_CLASSES)})",
                f"_class_name is {pipeline!r}",
            )
    config_path = folder / "transformer" / "config.json"
    config = _read_json(
        config_path, f"a diffusers transformer config.json ({' or '.join(TRANSFORMER_CLASSES)})"
    )
    if config.get("_class_name") not in TRANSFORMER_CLASSES:
        raise ModelFileError(
            config_path,
            f"a Lumina-Image-2.0 or Z-Image transformer ({' or '.join(TRANSFORMER_CLASSES)})",
            f"_class_name is {config.get('_class_name')!r}",
        )
    return config


def check_diffusers_folder(folder: str | Path, parts=("transformer", "text_encoder", "vae")) -> None:
    """Cheap checks before anything is loaded: class names, shard lists, headers, tokenizer files.

    Raises ModelFileError naming the first file that is missing or not what it should be.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFileError(folder, "a diffusers folder of Lumina-Image-2.0 or Z-Image", "it does not exist")
    transformer_config(folder)
    for part in parts:
        folder_tensor_infos(folder / part)
    if "text_encoder" in parts:
        check_tokenizer(folder)


def load_transformer_folder(folder: str | Path, dtype: torch.dtype | None = None):
    """``<folder>/transformer``: config.json + (sharded) safetensors -> ComfyUI ModelPatcher."""
    folder = Path(folder)
    config = transformer_config(folder)
    tdir = folder / "transformer"
    dtype = dtype or majority_float_dtype((i.dtype, i.numel) for i in folder_tensor_infos(tdir).values())
    state_dict = load_folder_state_dict(tdir, dtype)
    try:
        return nextdit_build.build_nextdit_from_diffusers(state_dict, config, dtype=dtype, consume=True)
    except ValueError as exc:
        expected = (
            f"a Lumina-Image-2.0 or Z-Image transformer whose config.json matches the weights in {tdir}"
        )
        raise ModelFileError(tdir / "config.json", expected, str(exc)) from exc


def load_transformer_file(path: str | Path, dtype: torch.dtype | None = None):
    """One .safetensors transformer, ComfyUI-named or diffusers-named (optionally behind an
    all-in-one checkpoint prefix) -> ComfyUI ModelPatcher."""
    infos = read_header(path)
    prefix = next((p for p in TRANSFORMER_PREFIXES if any(k.startswith(p) for k in infos)), "")
    names = [k for k in infos if k.startswith(prefix)]
    dtype = dtype or majority_float_dtype((infos[k].dtype, infos[k].numel) for k in names)
    state_dict = {k[len(prefix) :]: v for k, v in load_safetensors(path, dtype, names).items()}
    try:
        if nextdit_keys.is_comfy_nextdit(state_dict):
            return nextdit_build.build_nextdit(nextdit_keys.add_norm_final(state_dict), dtype=dtype)
        return nextdit_build.build_nextdit_from_diffusers(state_dict, dtype=dtype, consume=True)
    except ValueError as exc:
        raise ModelFileError(path, "a Lumina-Image-2.0 or Z-Image transformer", str(exc)) from exc


def load_diffusers_folder(folder: str | Path, dtype: torch.dtype | None = None):
    """(model, clip, vae) from a diffusers pipeline folder."""
    check_diffusers_folder(folder)
    return (
        load_transformer_folder(folder, dtype),
        clip_from_diffusers_folder(folder),
        vae_from_diffusers_folder(folder),
    )


def load_text_encoder_file(path: str | Path):
    sd = load_safetensors(path)
    if not any(k.startswith("model.") for k in sd):
        sd = {(k if k == "spiece_model" else f"model.{k}"): v for k, v in sd.items()}
    return clip_from_state_dict(sd, str(path))


def load_vae_file(path: str | Path):
    return vae_from_state_dict(load_safetensors(path), str(path))
