"""Text encoders of the Lumina family as ComfyUI CLIP objects, at any size.

Lumina-Image-2.0 uses Gemma-2 (hidden state of layer -2, BOS added); Z-Image uses Qwen3 (layer
-2, chat template). ComfyUI 0.3.75 has both classes but hard-codes the 2B/4B sizes; its
``<model_name>_model_config`` model option overrides them, so we read the sizes from the tensors
and hand them over. Only ``head_dim`` is a class constant there (Gemma-2: 256, Qwen3: 128).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ModelFileError
from .safetensors_io import load_folder_state_dict

# kind (= transformers' config.json model_type) -> (ComfyUI model name, head_dim fixed by its config class)
TEXT_ENCODERS = {"gemma2": ("gemma2_2b", 256), "qwen3": ("qwen3_4b", 128)}
# The tensors the sizes are read from (see text_encoder_config).
SIZE_KEYS = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
)


def detect_text_encoder(sd: dict[str, torch.Tensor], source: str) -> str:
    if (
        "model.layers.0.post_feedforward_layernorm.weight" in sd
        and "model.layers.0.self_attn.q_norm.weight" not in sd
    ):
        return "gemma2"
    if (
        "model.layers.0.self_attn.q_norm.weight" in sd
        and "model.layers.0.post_attention_layernorm.weight" in sd
    ):
        return "qwen3"
    raise ModelFileError(
        source,
        "a Gemma-2 (Lumina-Image-2.0) or Qwen3 (Z-Image) text encoder "
        "with HF key names (model.layers.N.self_attn...)",
    )


def text_encoder_width(sd: dict, source: str) -> tuple[str, int]:
    """(kind, hidden size) of an HF-keyed text encoder; ``sd`` may hold header entries (anything with
    a ``shape``) instead of tensors, so it is cheap before loading."""
    kind = detect_text_encoder(sd, source)
    missing = [key for key in SIZE_KEYS if key not in sd]
    if missing:
        raise ModelFileError(
            source,
            f"a complete {kind} text encoder (its sizes are read from {', '.join(SIZE_KEYS)})",
            f"{', '.join(missing)} missing",
        )
    return kind, sd["model.embed_tokens.weight"].shape[1]


def text_encoder_config(
    sd: dict[str, torch.Tensor], kind: str, source: str, hf_config: dict | None = None
) -> dict:
    """ComfyUI config overrides read from the tensor shapes (and config.json where shapes can't tell)."""
    text_encoder_width(sd, source)  # refuses a file without the size tensors below, naming them
    _, head_dim = TEXT_ENCODERS[kind]
    embed = sd["model.embed_tokens.weight"]
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    k = sd["model.layers.0.self_attn.k_proj.weight"]
    if kind == "qwen3" and sd["model.layers.0.self_attn.q_norm.weight"].shape[0] != head_dim:
        raise ModelFileError(
            source,
            f"Qwen3 head_dim {head_dim} (ComfyUI's Qwen3 class fixes it), "
            f"got q_norm of size {sd['model.layers.0.self_attn.q_norm.weight'].shape[0]}",
        )
    if hf_config and hf_config.get("head_dim", head_dim) != head_dim:
        raise ModelFileError(
            source,
            f"head_dim {head_dim} (fixed by ComfyUI's {kind} class), config.json says {hf_config['head_dim']}",
        )
    if q.shape[0] % head_dim or k.shape[0] % head_dim:
        raise ModelFileError(
            source,
            f"q/k projections in multiples of head_dim {head_dim}, got {tuple(q.shape)} / {tuple(k.shape)}",
        )
    n_layers = 1 + max(int(key.split(".")[2]) for key in sd if key.startswith("model.layers."))
    config = {
        "vocab_size": embed.shape[0],
        "hidden_size": embed.shape[1],
        "intermediate_size": sd["model.layers.0.mlp.gate_proj.weight"].shape[0],
        "num_hidden_layers": n_layers,
        "num_attention_heads": q.shape[0] // head_dim,
        "num_key_value_heads": k.shape[0] // head_dim,
    }
    if hf_config:
        # transformers 5 writes rope_theta inside rope_parameters; older configs at the top level
        rope_theta = (hf_config.get("rope_parameters") or {}).get("rope_theta", hf_config.get("rope_theta"))
        if rope_theta is not None:
            config["rope_theta"] = rope_theta
        for key in ("rms_norm_eps", "max_position_embeddings"):
            if key in hf_config:
                config[key] = hf_config[key]
    return config


def clip_from_state_dict(sd: dict[str, torch.Tensor], source: str, hf_config: dict | None = None):
    """A ComfyUI CLIP (tokenizer + encoder) from an HF-keyed state dict (``model.`` prefix)."""
    import comfy.sd

    kind = detect_text_encoder(sd, source)
    model_name, _ = TEXT_ENCODERS[kind]
    if kind == "gemma2" and "spiece_model" not in sd:
        raise ModelFileError(
            source,
            "the Gemma SentencePiece tokenizer (tokenizer/tokenizer.model in a "
            "diffusers folder, or a 'spiece_model' tensor in a single file)",
        )
    fp8_norms = sorted(
        k for k, v in sd.items() if kind == "gemma2" and "norm" in k and "float8" in str(v.dtype)
    )
    if fp8_norms:
        # ComfyUI's Gemma-2 RMSNorm adds 1 to its weight in the stored dtype, which fp8 cannot do
        raise ModelFileError(
            source,
            "Gemma-2 norm weights in bf16, fp16 or fp32 (as scaled-fp8 files keep them)",
            f"{fp8_norms[0]} is {sd[fp8_norms[0]].dtype}",
        )
    options = {f"{model_name}_model_config": text_encoder_config(sd, kind, source, hf_config)}
    return comfy.sd.load_text_encoder_state_dicts(
        [sd], clip_type=comfy.sd.CLIPType.LUMINA2, model_options=options
    )


def check_tokenizer(folder: str | Path) -> str:
    """The text encoder kind of a diffusers folder ("gemma2" or "qwen3"), once its tokenizer files are there.

    Gemma needs ``tokenizer/tokenizer.model`` (ComfyUI's Gemma tokenizer is SentencePiece). For Qwen3
    ComfyUI encodes with the Qwen tokenizer it ships; the folder's own ``tokenizer/`` must still be
    there, so that a half-copied folder is refused rather than silently completed.
    """
    folder = Path(folder)
    config_path = folder / "text_encoder" / "config.json"
    if not config_path.is_file():
        raise ModelFileError(config_path, "the text encoder's config.json", "it does not exist")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (ValueError, AttributeError) as exc:
        raise ModelFileError(config_path, "a transformers config.json", f"not a JSON object: {exc}") from exc
    if model_type not in TEXT_ENCODERS:
        raise ModelFileError(
            config_path,
            "a Gemma-2 (Lumina-Image-2.0) or Qwen3 (Z-Image) text encoder",
            f"model_type is {model_type!r}",
        )
    kind = model_type
    tokenizer = folder / "tokenizer"
    if kind == "gemma2" and not (tokenizer / "tokenizer.model").is_file():
        raise ModelFileError(
            tokenizer / "tokenizer.model",
            "Gemma's SentencePiece model (ComfyUI's Gemma tokenizer needs it)",
            "it does not exist",
        )
    if kind == "qwen3" and not any((tokenizer / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise ModelFileError(
            tokenizer, "the Qwen tokenizer folder (tokenizer.json or vocab.json)", "none found"
        )
    return kind


def clip_from_diffusers_folder(folder: str | Path):
    """``text_encoder/`` (HF model, possibly sharded) + ``tokenizer/`` of a diffusers folder."""
    folder = Path(folder)
    kind = check_tokenizer(folder)
    te_dir = folder / "text_encoder"
    hf_config = json.loads((te_dir / "config.json").read_text())
    raw = load_folder_state_dict(te_dir)
    sd = {
        k if k.startswith("model.") else f"model.{k}": v
        for k, v in raw.items()
        if not k.startswith("lm_head.")
    }
    if detect_text_encoder(sd, str(te_dir)) != kind:
        raise ModelFileError(
            te_dir,
            f"{kind} weights, as config.json says",
            f"the tensors are {detect_text_encoder(sd, str(te_dir))}",
        )
    if kind == "gemma2":
        spm = (folder / "tokenizer" / "tokenizer.model").read_bytes()
        sd["spiece_model"] = torch.frombuffer(bytearray(spm), dtype=torch.uint8)
    return clip_from_state_dict(sd, str(te_dir), hf_config)
