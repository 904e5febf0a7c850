"""Content-addressed on-disk cache of VAE latents and text-encoder outputs.

A cached file's name is a hash of everything that determines its content, so a cache is reused by any
later run (and any other dataset holding the same image) and is "invalidated" simply by no longer
being asked for when anything changes:

    latents/<vae fingerprint>/<sha256(image bytes)>_<width>x<height>.safetensors    (raw VAE latent)
    text/<text-encoder fingerprint>/<sha256(prompt text)>.safetensors               (cond [+ mask])

A model fingerprint hashes the class, every tensor's name, shape and dtype and a strided sample of its
values (up to 1024 per tensor) - cheap for multi-GB models, and any real change of weights changes it.
For a CLIP it also covers the tokenizer class, options, layer_idx and the keys/strengths of LoRA
patches applied to it. Files are written to a temporary name and renamed, so an interrupted run never
leaves a half-written entry. The whole folder may be deleted at any time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from .durable import publish

_SAMPLE = 1024


def sha256_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tensor_sample_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    if flat.numel() > _SAMPLE:
        flat = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE]
    return (
        flat.to(device="cpu", dtype=torch.float64 if flat.is_floating_point() else torch.int64)
        .numpy()
        .tobytes()
    )


def state_dict_fingerprint(state_dict: dict, extra: object = None) -> str:
    """Hash of names, shapes, dtypes and a strided value sample of every tensor (+ ``extra``, JSON)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        if tensor.numel() and tensor.device.type != "meta":
            digest.update(tensor_sample_bytes(tensor))
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def vae_fingerprint(vae) -> str:
    model = vae.first_stage_model
    extra = {
        "class": type(model).__qualname__,
        "latent_channels": getattr(vae, "latent_channels", None),
        "downscale": str(getattr(vae, "downscale_ratio", None)),
    }
    return state_dict_fingerprint(model.state_dict(), extra)


def clip_fingerprint(clip) -> str:
    model = clip.cond_stage_model
    patches = getattr(clip.patcher, "patches", {}) or {}
    patch_summary = sorted(
        (key, [(float(p[0]), float(p[2])) for p in entries]) for key, entries in patches.items()
    )
    extra = {
        "class": type(model).__qualname__,
        "tokenizer": type(clip.tokenizer).__qualname__,
        "tokenizer_options": getattr(clip, "tokenizer_options", {}),
        "layer_idx": getattr(clip, "layer_idx", None),
        "patches": patch_summary,
    }
    return state_dict_fingerprint(model.state_dict(), extra)


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None, *, durable: bool = False
) -> None:
    """Write ``tensors`` to ``path`` through a temporary file in the same folder and an atomic rename.

    ``durable``: flush the data to the disk before the rename (a user's LoRA; cache entries can be
    recomputed and skip it)."""
    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        safetensors.torch.save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata
        )
        if durable:
            publish(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FeatureCache:
    """Reads and writes the latent/text entries under ``root`` for one VAE and one text encoder."""

    def __init__(self, root, vae_fp: str, clip_fp: str):
        self.root = Path(root)
        self.vae_fp, self.clip_fp = vae_fp, clip_fp

    def latent_path(self, image_sha: str, size: tuple[int, int]) -> Path:
        return self.root / "latents" / self.vae_fp[:20] / f"{image_sha[:40]}_{size[0]}x{size[1]}.safetensors"

    def text_path(self, prompt: str) -> Path:
        return self.root / "text" / self.clip_fp[:20] / f"{sha256_text(prompt)[:40]}.safetensors"

    @staticmethod
    def readable(path: Path) -> bool:
        """True when ``path`` is a complete safetensors file (a corrupt one is re-encoded, not trusted)."""
        if not path.is_file():
            return False
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return len(list(handle.keys())) > 0
        except Exception:
            return False


def encode_latent(vae, image: torch.Tensor) -> torch.Tensor:
    """ComfyUI VAE encode of [1, H, W, 3] pixels in [0, 1]; returns the raw latent [C, h, w] (float32, CPU)."""
    latent = vae.encode(image)
    return latent[0].to(device="cpu", dtype=torch.float32)


def encode_prompt(clip, prompt: str) -> dict[str, torch.Tensor]:
    """ComfyUI text encode (the same call CLIPTextEncode makes): {'cond': [L, D], 'attention_mask': [L]?}."""
    tokens = clip.tokenize(prompt)
    conditioning = clip.encode_from_tokens_scheduled(tokens)
    if len(conditioning) != 1:
        raise ValueError(
            f"the text encoder returned {len(conditioning)} conditionings for one caption; expected 1"
        )
    cond, extra = conditioning[0]
    out = {"cond": cond[0].to("cpu")}
    mask = extra.get("attention_mask")
    if mask is not None:
        out["attention_mask"] = mask[0].to("cpu")
    return out
