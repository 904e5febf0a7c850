"""Open the files people have: a diffusers folder, or single files, of Lumina-Image-2.0 / Z-Image.

Returns ComfyUI objects (ModelPatcher, CLIP, VAE) built with ComfyUI's own classes, sized from the
files (config.json or tensor shapes), so tiny, pruned and future sizes load as well as the
released ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import nextdit_build, nextdit_keys
from .errors import ModelFileError
from .safetensors_io import load_folder_state_dict, load_safetensors
from .text_encoders import clip_from_diffusers_folder, clip_from_state_dict
from .vae import vae_from_diffusers_folder, vae_from_state_dict

DTYPES = {"default": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Prefixes that all-in-one checkpoints put in front of the transformer keys.
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")


def is_diffusers_folder(path: Path) -> bool:
    return (Path(path) / "transformer" / "config.json").is_file()


def load_transformer_folder(folder: Path, dtype: torch.dtype | None = None):
    """``<folder>/transformer``: config.json + (sharded) safetensors -> ComfyUI ModelPatcher."""
    tdir = Path(folder) / "transformer"
    config_path = tdir / "config.json"
    if not config_path.is_file():
        raise ModelFileError(config_path, "a diffusers transformer config.json "
                             "(Lumina2Transformer2DModel or ZImageTransformer2DModel)")
    config = json.loads(config_path.read_text())
    if config.get("_class_name") not in ("Lumina2Transformer2DModel", "ZImageTransformer2DModel"):
        raise ModelFileError(config_path, "a Lumina-Image-2.0 or Z-Image transformer",
                             f"_class_name is {config.get('_class_name')!r}")
    sd = load_folder_state_dict(tdir)
    try:
        return nextdit_build.build_nextdit_from_diffusers(sd, config, dtype=dtype)
    except ValueError as exc:
        raise ModelFileError(tdir, "weights that match its config.json", str(exc)) from exc


def load_transformer_file(path: Path, dtype: torch.dtype | None = None):
    """One .safetensors transformer, ComfyUI-named or diffusers-named -> ComfyUI ModelPatcher."""
    sd = load_safetensors(path)
    for prefix in TRANSFORMER_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    try:
        if nextdit_keys.is_comfy_nextdit(sd):
            return nextdit_build.build_nextdit(sd, dtype=dtype)
        return nextdit_build.build_nextdit_from_diffusers(sd, dtype=dtype)
    except ValueError as exc:
        raise ModelFileError(path, "a Lumina-Image-2.0 or Z-Image transformer", str(exc)) from exc


def load_diffusers_folder(folder: Path, dtype: torch.dtype | None = None):
    """(model, clip, vae) from a diffusers pipeline folder."""
    folder = Path(folder)
    if not is_diffusers_folder(folder):
        raise ModelFileError(folder, "a diffusers folder of Lumina-Image-2.0 or Z-Image "
                             "(transformer/, text_encoder/, tokenizer/, vae/)")
    return load_transformer_folder(folder, dtype), clip_from_diffusers_folder(folder), vae_from_diffusers_folder(folder)


def load_text_encoder_file(path: Path):
    sd = load_safetensors(path)
    if not any(k.startswith("model.") for k in sd):
        sd = {(k if k == "spiece_model" else f"model.{k}"): v for k, v in sd.items()}
    return clip_from_state_dict(sd, str(path))


def load_vae_file(path: Path):
    return vae_from_state_dict(load_safetensors(path), str(path))
