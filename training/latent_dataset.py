"""LT_DATASET from latents: a ComfyUI LATENT batch (e.g. from VAEEncode) or a safetensors file of latents,
plus captions, cached and bucketed like an image folder.

The latents are taken as raw VAE output (what VAEEncode gives and what the image path caches); the
trainer maps them into the model's space. Each latent is cached under a hash of its values, so the
same latents give the same dataset key and a resumed run finds its checkpoint. Buckets are the latent
sizes (as pixels, ``downscale`` pixels per latent cell): batches never mix sizes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cache
from .data_files import DatasetError
from .dataset import (
    CachedDataset,
    DatasetItem,
    dataset_prompts,
    encode_prompts,
    finish_dataset,
    new_stats,
    progress_counter,
    prompt_text,
)

LATENT_SOURCE = "latent-input"  # the cache's stand-in for a VAE fingerprint: no VAE encoded these
DOWNSCALE = 8  # pixels per latent cell of the Flux-type VAE both families use


@dataclass
class LatentData:
    """Latents [C, h, w] (raw VAE space) with one caption each, ready for :func:`build_from_latents`."""

    latents: list[torch.Tensor]
    captions: list[str]
    num_repeats: int = 1

    def __len__(self) -> int:
        return len(self.latents)


def split_latents(samples, origin: str = "latents") -> list[torch.Tensor]:
    """A LATENT's ``samples`` [N, C, h, w] (or a list of such / of [C, h, w]) -> a list of [C, h, w] float32."""
    if isinstance(samples, dict):
        if "samples" not in samples:
            raise DatasetError(
                f"{origin}: expected a LATENT (a dict with 'samples'), got keys {sorted(samples)}"
            )
        samples = samples["samples"]
    parts = list(samples) if isinstance(samples, (list, tuple)) else [samples]
    out = []
    for part in parts:
        if not isinstance(part, torch.Tensor) or part.ndim not in (3, 4) or not part.is_floating_point():
            shape = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
            raise DatasetError(
                f"{origin}: expected image latents [N, C, h, w] or [C, h, w] (float), got {shape}"
            )
        batch = part[None] if part.ndim == 3 else part
        if not torch.isfinite(batch).all():
            raise DatasetError(f"{origin}: holds NaN or infinite values")
        out.extend(latent.detach().to(device="cpu", dtype=torch.float32).contiguous() for latent in batch)
    if not out:
        raise DatasetError(f"{origin}: holds no latents")
    return out


def parse_captions(captions, count: int, origin: str = "captions") -> list[str]:
    """One caption per latent, or one for all: a list, or text with one caption per non-empty line."""
    lines = captions.splitlines() if isinstance(captions, str) else list(captions)
    lines = [line.strip() for line in lines if isinstance(line, str) and line.strip()]
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise DatasetError(
            f"{origin}: {len(lines)} captions for {count} latents; give one caption per latent (one per "
            "line) or a single caption for all"
        )
    return lines


def load_latents_file(path: Path, caption_extension: str = ".txt", num_repeats: int = 1) -> LatentData:
    """A safetensors file of latents (every 3-D/4-D tensor in key order; ComfyUI's .latent files work) and
    its same-name caption file (one caption per latent, one per line, or one line for all)."""
    import safetensors.torch

    path = Path(path)
    if not path.is_file():
        raise DatasetError(
            f"[dataset] latents: {path} does not exist (expected a safetensors file of latents)"
        )
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as exc:  # any unreadable file gets one clear message
        raise DatasetError(f"[dataset] latents: {path} is not a readable safetensors file ({exc})") from None
    parts = [tensors[key] for key in sorted(tensors) if tensors[key].ndim in (3, 4)]
    if not parts:
        raise DatasetError(f"[dataset] latents: {path} holds no [N, C, h, w] or [C, h, w] tensor")
    latents = split_latents(parts, origin=f"[dataset] latents ({path.name})")
    caption_file = path.with_suffix(caption_extension)
    if not caption_file.is_file():
        raise DatasetError(
            f"[dataset] latents: no caption file {caption_file} (one caption per latent per line, or one line for all)"
        )
    captions = parse_captions(
        caption_file.read_text(encoding="utf-8"), len(latents), f"[dataset] {caption_file.name}"
    )
    return LatentData(latents, captions, num_repeats)


def latent_sha(latent: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{tuple(latent.shape)}|".encode())
    digest.update(latent.numpy().tobytes())
    return digest.hexdigest()


def build_from_latents(
    data: LatentData,
    *,
    clip,
    cache_root,
    caption_dropout_rate: float = 0.0,
    max_sequence_length: int = 512,
    system_prompt: str = "none",
    downscale: int = DOWNSCALE,
    progress: Callable[[int, int], None] | None = None,
) -> CachedDataset:
    """The same CachedDataset an image folder gives, from latents: cached, bucketed by latent size."""
    if len(data.captions) != len(data.latents):
        raise DatasetError(f"captions: {len(data.captions)} for {len(data.latents)} latents")
    channels = {latent.shape[0] for latent in data.latents}
    if len(channels) > 1:
        raise DatasetError(f"latents: mixed channel counts {sorted(channels)}; one model's VAE makes one")
    feature_cache = cache.FeatureCache(cache_root, LATENT_SOURCE, cache.clip_fingerprint(clip))
    stats = new_stats(len(data))
    unique_prompts = dataset_prompts(data.captions, system_prompt)
    step = progress_counter(len(data) + len(unique_prompts), progress)

    items = []
    for index, (latent, caption) in enumerate(zip(data.latents, data.captions, strict=True)):
        size = (latent.shape[2] * downscale, latent.shape[1] * downscale)
        latent_file = feature_cache.latent_path(latent_sha(latent), size)
        if feature_cache.readable(latent_file):
            stats["latents_cached"] += 1
        else:  # nothing to encode: the cache entry is the latent itself
            cache.atomic_save_safetensors({"latent": latent}, latent_file)
            stats["latents_encoded"] += 1
        text_file = feature_cache.text_path(prompt_text(caption, system_prompt))
        items.append(
            DatasetItem(f"latent {index}", caption, data.num_repeats, size, str(latent_file), str(text_file))
        )
        step()
    encode_prompts(feature_cache, clip, unique_prompts, stats, step)
    description = {"source": LATENT_SOURCE, "downscale": downscale}
    return finish_dataset(
        feature_cache, items, stats, description, caption_dropout_rate, max_sequence_length, system_prompt
    )


def latent_dataset(
    latents, captions: str | Sequence[str], *, num_repeats: int = 1, **kwargs
) -> CachedDataset:
    """A LATENT (or tensors) + captions -> CachedDataset; errors name the input."""
    parts = split_latents(latents)
    return build_from_latents(LatentData(parts, parse_captions(captions, len(parts)), num_repeats), **kwargs)
