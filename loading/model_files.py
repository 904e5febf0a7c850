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

from . import fp8, nextdit_build, nextdit_config, nextdit_keys
from .errors import ModelFileError
from .safetensors_io import (
    folder_tensor_infos,
    load_folder_state_dict,
    load_safetensors,
    majority_float_dtype,
    read_header,
)
from .text_encoders import (
    check_tokenizer,
    clip_from_state_dict,
    text_encoder_width,
)
from .text_encoders import (
    clip_from_diffusers_folder as clip_from_diffusers_folder,
)
from .vae import vae_from_diffusers_folder as vae_from_diffusers_folder
from .vae import vae_from_state_dict

DTYPES = {
    "default": None,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    **fp8.FP8_CHOICES,
}
TRANSFORMER_CLASSES = ("Lumina2Transformer2DModel", "ZImageTransformer2DModel")
PIPELINE_CLASSES = ("Lumina2Pipeline", "Lumina2Text2ImgPipeline", "ZImagePipeline")
# Prefixes that all-in-one checkpoints put in front of the transformer keys.
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
FAMILY_NAMES = {nextdit_keys.LUMINA2: "Lumina-Image-2.0", nextdit_keys.ZIMAGE: "Z-Image"}
# The text encoder whose hidden states each family's caption embedder reads.
TEXT_ENCODER_OF = {nextdit_keys.LUMINA2: "gemma2", nextdit_keys.ZIMAGE: "qwen3"}
TEXT_ENCODER_NAMES = {"gemma2": "Gemma-2", "qwen3": "Qwen3"}


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


def weight_dtype_options(name: str) -> dict:
    """The load functions' keyword arguments for a weight_dtype choice ("default", "bf16", "fp8_e4m3fn", ...)."""
    problem = fp8.choice_problem(name)
    if problem:
        raise ValueError(f"weight_dtype: {problem}")
    return {"dtype": DTYPES[name], "fp8_optimizations": name in fp8.FAST_CHOICES}


def _check_storage(dtype: torch.dtype | None) -> None:
    problem = fp8.storage_problem(dtype)
    if problem:
        raise ValueError(f"weight_dtype: {problem}; choose bf16 or fp16")


def load_transformer_folder(folder: str | Path, dtype: torch.dtype | None = None, fp8_optimizations=False):
    """``<folder>/transformer``: config.json + (sharded) safetensors -> ComfyUI ModelPatcher.

    Tensors are converted to ``dtype`` (fp8 included) as they are read, one at a time, so the model
    is never held in a wider dtype on the way.
    """
    folder = Path(folder)
    _check_storage(dtype)
    config = transformer_config(folder)
    tdir = folder / "transformer"
    dtype = dtype or majority_float_dtype((i.dtype, i.numel) for i in folder_tensor_infos(tdir).values())
    state_dict = load_folder_state_dict(tdir, dtype)
    try:
        return nextdit_build.build_nextdit_from_diffusers(
            state_dict, config, dtype=dtype, consume=True, fp8_optimizations=fp8_optimizations
        )
    except ValueError as exc:
        expected = (
            f"a Lumina-Image-2.0 or Z-Image transformer whose config.json matches the weights in {tdir}"
        )
        raise ModelFileError(tdir / "config.json", expected, str(exc)) from exc


def transformer_header(path: str | Path) -> tuple[str, dict]:
    """(prefix, header entries named without it) of a transformer file, or of a diffusers
    ``transformer/`` folder's shards (no prefix); nothing but the headers is read."""
    if Path(path).is_dir():
        return "", folder_tensor_infos(path)
    infos = read_header(path)
    prefix = next((p for p in TRANSFORMER_PREFIXES if any(k.startswith(p) for k in infos)), "")
    return prefix, {k[len(prefix) :]: v for k, v in infos.items() if k.startswith(prefix)}


def transformer_family_and_width(infos: dict, source: str | Path) -> tuple[str, int]:
    """(family, caption width) of a transformer from its key names and the caption embedder's shape
    (header entries are enough), so another model's file is refused before its tensors are read."""
    if nextdit_keys.is_comfy_nextdit(infos):
        family, caption = nextdit_keys.detect_comfy_family(infos), "cap_embedder.1.weight"
    else:
        try:
            family = nextdit_keys.detect_diffusers_family(infos)
        except ValueError as exc:
            expected = "a Lumina-Image-2.0 or Z-Image transformer (ComfyUI NextDiT or diffusers key names)"
            raise ModelFileError(source, expected, str(exc)) from exc
        caption = {
            nextdit_keys.LUMINA2: "time_caption_embed.caption_embedder.1.weight",
            nextdit_keys.ZIMAGE: "cap_embedder.1.weight",
        }[family]
    if caption not in infos:
        raise ModelFileError(
            source, f"a {FAMILY_NAMES[family]} transformer with {caption!r}", "it is missing"
        )
    return family, infos[caption].shape[1]


def text_encoder_names(sd: dict) -> dict:
    """HF text-encoder keys as ComfyUI reads them: a bare Gemma2Model / Qwen3Model saves them
    without the ``model.`` prefix."""
    if any(k.startswith("model.") for k in sd):
        return sd
    return {(k if k in ("spiece_model", fp8.MARKER) else f"model.{k}"): v for k, v in sd.items()}


def check_pairing(transformer: str | Path, text_encoder: str | Path) -> None:
    """Refuse a text encoder whose hidden states the transformer cannot read, from headers only.

    ``transformer``: a single file or a diffusers ``transformer/`` folder; ``text_encoder``: a file or
    a ``text_encoder/`` folder. Lumina-Image-2.0 reads Gemma-2, Z-Image Qwen3, and the caption
    embedder's input width is the text encoder's hidden size.
    """
    family, width = transformer_family_and_width(transformer_header(transformer)[1], transformer)
    te_infos = folder_tensor_infos(text_encoder) if Path(text_encoder).is_dir() else read_header(text_encoder)
    kind, hidden = text_encoder_width(text_encoder_names(te_infos), str(text_encoder))
    if kind != TEXT_ENCODER_OF[family]:
        raise ModelFileError(
            text_encoder,
            f"a {TEXT_ENCODER_NAMES[TEXT_ENCODER_OF[family]]} text encoder, which the "
            f"{FAMILY_NAMES[family]} transformer {transformer} reads",
            f"it is a {TEXT_ENCODER_NAMES[kind]} text encoder",
        )
    if hidden != width:
        raise ModelFileError(
            text_encoder,
            f"hidden size {width}, the caption width of the transformer {transformer}",
            f"its hidden size is {hidden}",
        )


def check_transformer_header(infos: dict, source: str | Path) -> None:
    """Refuse, from the header alone, a transformer whose tensors are not exactly the keys and shapes
    of the NextDiT its own shapes describe: an extra or oversized tensor (a header may declare gigabytes)
    is refused before any of it is read."""
    meta = {name: torch.empty(info.shape, dtype=info.dtype, device="meta") for name, info in infos.items()}
    try:
        if nextdit_keys.is_comfy_nextdit(meta):
            meta = nextdit_keys.add_norm_final(meta)
        else:
            meta = nextdit_keys.diffusers_to_comfy(meta)
        unet_config = nextdit_config.unet_config_from_state_dict(meta)
        nextdit_config.validate_unet_config(unet_config, meta)
    except ValueError as exc:
        raise ModelFileError(source, "a Lumina-Image-2.0 or Z-Image transformer", str(exc)) from exc


def check_scaled_fp8_header(path: str | Path) -> None:
    """A scaled-fp8 transformer file's scales checked from its header (nothing else is read); other
    files pass. Raises ModelFileError naming the file and the scale that is missing or mis-shaped."""
    _, infos = transformer_header(path)
    marker = infos.pop(fp8.MARKER, None)
    if marker is None:
        return
    weights, scales = fp8.split_scales(infos)
    if not nextdit_keys.is_comfy_nextdit(weights):
        return  # load_transformer_file explains it
    try:
        config = nextdit_config.unet_config_from_state_dict(weights)
        linear_dtype, _ = fp8.marker_settings(marker)
        fp8.check_scales(weights, scales, nextdit_config.linear_modules(config), linear_dtype)
    except ValueError as exc:
        raise ModelFileError(
            path, "a Lumina-Image-2.0 or Z-Image transformer in ComfyUI's scaled fp8 format", str(exc)
        ) from exc


def load_transformer_file(path: str | Path, dtype: torch.dtype | None = None, fp8_optimizations=False):
    """One .safetensors transformer, ComfyUI-named or diffusers-named (optionally behind an
    all-in-one checkpoint prefix) -> ComfyUI ModelPatcher.

    A file with ComfyUI's ``scaled_fp8`` marker (pre-quantized) keeps its fp8 Linear weights and their
    scales as stored and loads through ComfyUI's scaled fp8 operations, as UNETLoader loads it.
    """
    _check_storage(dtype)
    prefix, infos = transformer_header(path)
    marker = infos.pop(fp8.MARKER, None)
    weights_infos, scale_infos = fp8.split_scales(infos) if marker is not None else (infos, {})
    transformer_family_and_width(weights_infos, path)
    if marker is not None and not nextdit_keys.is_comfy_nextdit(weights_infos):
        raise ModelFileError(
            path, "a scaled-fp8 transformer with ComfyUI NextDiT key names (as ComfyUI writes them)",
            "it has diffusers key names",
        )  # fmt: skip
    # every tensor checked from the header before any is read (a header may declare gigabytes)
    check_transformer_header(weights_infos, path)
    if marker is not None:
        check_scaled_fp8_header(path)
    if marker is None:
        dtype = dtype or majority_float_dtype((info.dtype, info.numel) for info in infos.values())
    names = [prefix + k for k in infos]
    # a scaled file is read as stored: its fp8 weights only make sense with their scales
    read_dtype = dtype if marker is None else None
    state_dict = {k[len(prefix) :]: v for k, v in load_safetensors(path, read_dtype, names).items()}
    scaled_fp8 = None
    if marker is not None:
        scaled_fp8 = load_safetensors(path, None, [prefix + fp8.MARKER])[prefix + fp8.MARKER]
    try:
        if nextdit_keys.is_comfy_nextdit(state_dict):
            return nextdit_build.build_nextdit(
                nextdit_keys.add_norm_final(state_dict), dtype=dtype,
                fp8_optimizations=fp8_optimizations, scaled_fp8=scaled_fp8,
            )  # fmt: skip
        return nextdit_build.build_nextdit_from_diffusers(
            state_dict, dtype=dtype, consume=True, fp8_optimizations=fp8_optimizations
        )
    except ValueError as exc:
        expected = "a Lumina-Image-2.0 or Z-Image transformer"
        if scale_infos or marker is not None:
            expected += " in ComfyUI's scaled fp8 format"
        raise ModelFileError(path, expected, str(exc)) from exc


def load_text_encoder_file(path: str | Path):
    return clip_from_state_dict(text_encoder_names(load_safetensors(path)), str(path))


def load_vae_file(path: str | Path):
    return vae_from_state_dict(load_safetensors(path), str(path))
