"""Shared helpers of the trainer tests: tiny models loaded once per process, small synthetic data sets."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from lumina_turbo.devtools.harness import MODELS_DIR


@pytest.fixture(autouse=True)
def one_thread():
    """Run trainer tests on one torch thread, restored afterwards.

    Several test processes share 2 cores; OpenMP threads then spin against each other (measured: a
    1024-wide rms_norm took 40 ms with 2 threads under load, 0.1 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FAMILY_FILES = {
    "lumina2": ("tiny-random-lumina2.safetensors", "tiny-random-gemma2.safetensors"),
    "zimage": ("tiny-random-zimage.safetensors", "tiny-random-qwen3.safetensors"),
}


@functools.cache
def tiny_family(family: str):
    """(MODEL, CLIP, VAE) of a tiny family, loaded outside the executor (weights are normal tensors)."""
    from lumina_turbo.devtools.comfy_host import bootstrap

    bootstrap()
    from lumina_turbo.loading import model_files

    transformer, text_encoder = FAMILY_FILES[family]
    model = model_files.load_transformer_file(MODELS_DIR / "diffusion_models" / transformer)
    clip = model_files.load_text_encoder_file(MODELS_DIR / "text_encoders" / text_encoder)
    vae = model_files.load_vae_file(MODELS_DIR / "vae" / "tiny-random-flux-vae.safetensors")
    return model, clip, vae


def token_length(clip, text: str) -> int:
    from lumina_turbo.training.cache import encode_prompt

    return encode_prompt(clip, text)["cond"].shape[0]


def build(folder: Path, family: str = "lumina2", cache: Path | None = None, **kwargs):
    from lumina_turbo.training.dataset import build_from_folder

    _, clip, vae = tiny_family(family)
    options = {"resolution": 64, "bucket_step": 64, **kwargs}
    return build_from_folder(
        folder, vae=vae, clip=clip, cache_root=cache or folder.parent / "cache", **options
    )


def small_config(**changes):
    from lumina_turbo.training.config import TrainConfig

    base = dict(
        max_train_steps=4,
        network_dim=4,
        network_alpha=4.0,
        learning_rate=1e-3,
        mixed_precision="fp32",
        gradient_checkpointing=False,
        save_every_n_steps=0,
        batch_size=1,
        seed=7,
    )
    return TrainConfig(**{**base, **changes})
