"""LT_DATASET: a folder of captioned images cached as VAE latents and text-encoder outputs.

``build_dataset`` scans the folder, assigns aspect-ratio buckets, encodes only what the cache lacks
(progress reported per item) and returns a ``CachedDataset`` holding file references; tensors are
read (and kept in memory) when the trainer first asks for them. Batches are drawn within one bucket,
in an order that depends only on (seed, epoch), so a resumed run sees the same batches.

Latents are the VAE's raw output; the trainer maps them into the model's latent space
(``process_latent_in``) because that depends on the model, not on the cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import buckets, cache
from .data_files import ImageRecord, scan_folder

MEMORY_ENTRIES = 512  # cached files kept in RAM per dataset (latents and captions)
LUMINA2_SYSTEM_PROMPTS = {
    "superior": "You are an assistant designed to generate superior images with the superior degree of "
    "image-text alignment based on textual prompts or user prompts.",
    "alignment": "You are an assistant designed to generate high-quality images with the highest degree of "
    "image-text alignment based on textual prompts.",
}


def prompt_text(caption: str, system_prompt: str) -> str:
    """What the text encoder sees: the caption, or CLIPTextEncodeLumina2's '<system> <Prompt Start> <caption>'."""
    if system_prompt == "none":
        return caption
    return f"{LUMINA2_SYSTEM_PROMPTS[system_prompt]} <Prompt Start> {caption}"


@dataclass(frozen=True)
class DatasetItem:
    image: str
    caption: str
    repeats: int
    size: tuple[int, int]  # bucket (width, height) in pixels
    latent_file: str
    text_file: str


@dataclass
class CachedDataset:
    """What LTDataset outputs: references to the cached tensors plus the batching rules."""

    items: list[DatasetItem]
    empty_text_file: str
    caption_dropout_rate: float
    max_sequence_length: int
    key: str
    stats: dict
    description: dict = field(default_factory=dict)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_samples(self) -> int:
        return sum(item.repeats for item in self.items)

    def _load(self, path: str) -> dict[str, torch.Tensor]:
        # A bounded in-memory LRU: small data sets stay in RAM, large ones are re-read (small files).
        if path in self._memo:
            self._memo[path] = self._memo.pop(path)
            return self._memo[path]
        import safetensors.torch

        try:
            tensors = safetensors.torch.load_file(path)
        except (OSError, RuntimeError) as exc:
            raise FileNotFoundError(
                f"dataset cache entry {path} is missing or unreadable ({exc}); run LTDataset again to re-encode"
            ) from exc
        self._memo[path] = tensors
        while len(self._memo) > MEMORY_ENTRIES:
            self._memo.pop(next(iter(self._memo)))
        return tensors

    def latent(self, index: int) -> torch.Tensor:
        """Raw VAE latent [C, h, w] of item ``index`` (float32)."""
        return self._load(self.items[index].latent_file)["latent"]

    def text(self, index: int | None) -> torch.Tensor:
        """Text-encoder output [L, D] of item ``index`` (None: the empty caption), at most max_sequence_length tokens."""
        path = self.empty_text_file if index is None else self.items[index].text_file
        return self._load(path)["cond"][: self.max_sequence_length]

    def epoch_batches(self, epoch: int, batch_size: int, seed: int, shuffle: bool = True) -> list[list[int]]:
        """Item indices of every batch of ``epoch``; each batch lies in one bucket, repeats included.

        Deterministic in (seed, epoch): no generator state needs saving for an exact resume.
        """
        generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(self.items):
            by_bucket.setdefault(item.size, []).extend([index] * item.repeats)
        batches = []
        for size in sorted(by_bucket):
            members = by_bucket[size]
            if shuffle:
                members = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
        if shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def batches_per_epoch(self, batch_size: int) -> int:
        sizes: dict[tuple[int, int], int] = {}
        for item in self.items:
            sizes[item.size] = sizes.get(item.size, 0) + item.repeats
        return sum(-(-count // batch_size) for count in sizes.values())


def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little") & (2**63 - 1)


def build_dataset(
    records: list[ImageRecord],
    *,
    vae,
    clip,
    cache_root,
    resolution: int = 1024,
    bucket_step: int = 64,
    enable_bucket: bool = True,
    max_aspect_ratio: float = 4.0,
    caption_dropout_rate: float = 0.0,
    max_sequence_length: int = 512,
    system_prompt: str = "none",
    progress: Callable[[int, int], None] | None = None,
    share: tuple[int, int] = (0, 1),
) -> CachedDataset:
    """Encode what the cache lacks and return the dataset; ``progress(done, total)`` is called per item.

    ``progress`` may raise (ComfyUI's interrupt) - files already written stay valid.
    ``share = (rank, world)``: encode only every world-th missing latent and prompt, from the rank-th on;
    the other processes of a run encode the rest, and the dataset is complete once all have finished.
    """
    rank, world = share
    feature_cache = cache.FeatureCache(cache_root, cache.vae_fingerprint(vae), cache.clip_fingerprint(clip))
    stats = new_stats(len(records))
    unique_prompts = dataset_prompts([r.caption for r in records], system_prompt)
    step = progress_counter(len(records) + len(unique_prompts), progress)

    items = []
    for position, record in enumerate(records):
        image_sha = cache.sha256_file(record.path)
        image = buckets.load_image(record.path)
        size = buckets.target_size(
            image.width,
            image.height,
            resolution=resolution,
            step=bucket_step,
            enable_bucket=enable_bucket,
            max_aspect_ratio=max_aspect_ratio,
        )
        latent_file = feature_cache.latent_path(image_sha, size)
        if feature_cache.readable(latent_file):
            stats["latents_cached"] += 1
        elif position % world == rank:
            latent = cache.encode_latent(vae, buckets.fit_to_bucket(image, size))
            cache.atomic_save_safetensors({"latent": latent}, latent_file)
            stats["latents_encoded"] += 1
        text_file = feature_cache.text_path(prompt_text(record.caption, system_prompt))
        items.append(
            DatasetItem(
                str(record.path), record.caption, record.repeats, size, str(latent_file), str(text_file)
            )
        )
        step()
    encode_prompts(feature_cache, clip, unique_prompts, stats, step, share)
    description = {
        "vae": feature_cache.vae_fp,
        "resolution": resolution,
        "bucket_step": bucket_step,
        "enable_bucket": enable_bucket,
        "max_aspect_ratio": max_aspect_ratio,
    }
    return finish_dataset(
        feature_cache, items, stats, description, caption_dropout_rate, max_sequence_length, system_prompt
    )


def new_stats(images: int) -> dict:
    return {
        "images": images,
        "latents_encoded": 0,
        "latents_cached": 0,
        "texts_encoded": 0,
        "texts_cached": 0,
    }


def dataset_prompts(captions, system_prompt: str) -> list[str]:
    """The distinct text-encoder prompts of a data set: every caption and the empty one (caption dropout)."""
    prompts = [prompt_text(c, system_prompt) for c in captions] + [prompt_text("", system_prompt)]
    return list(dict.fromkeys(prompts))


def progress_counter(total: int, progress: Callable[[int, int], None] | None) -> Callable[[], None]:
    done = 0

    def step():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    return step


def encode_prompts(feature_cache, clip, prompts, stats: dict, step, share: tuple[int, int] = (0, 1)) -> None:
    """Encode the prompts the cache lacks (this process's share of them)."""
    rank, world = share
    for position, prompt in enumerate(prompts):
        text_file = feature_cache.text_path(prompt)
        if feature_cache.readable(text_file):
            stats["texts_cached"] += 1
        elif position % world == rank:
            cache.atomic_save_safetensors(cache.encode_prompt(clip, prompt), text_file)
            stats["texts_encoded"] += 1
        step()


def finish_dataset(
    feature_cache, items, stats, description: dict, caption_dropout_rate, max_sequence_length, system_prompt
) -> CachedDataset:
    """The CachedDataset, keyed by everything that shapes it (``description`` + the shared settings)."""
    description = {
        **description,
        "text_encoder": feature_cache.clip_fp,
        "caption_dropout_rate": caption_dropout_rate,
        "max_sequence_length": max_sequence_length,
        "system_prompt": system_prompt,
        "items": [(Path(i.latent_file).name, Path(i.text_file).name, i.repeats) for i in items],
    }
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    empty = str(feature_cache.text_path(prompt_text("", system_prompt)))
    return CachedDataset(
        items, empty, float(caption_dropout_rate), int(max_sequence_length), key, stats, description
    )


def build_from_folder(
    folder: Path, *, num_repeats: int = 1, caption_extension: str = ".txt", **kwargs
) -> CachedDataset:
    return build_dataset(
        scan_folder(folder, num_repeats=num_repeats, caption_extension=caption_extension), **kwargs
    )
