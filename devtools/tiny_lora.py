"""A tiny random LoRA for the tiny Z-Image model, in the diffusers / PEFT layout ComfyUI 0.3.75 ignores.

``loras/tiny-random-zimage-lora-diffusers.safetensors``: keys
``transformer.<stack>.<i>.attention.to_q|to_k|to_v|to_out.0.lora_A|lora_B.weight`` and
``...feed_forward.w1|w2|w3...`` with no alpha (scale 1), as ``save_lora_weights`` of diffusers writes
them. ComfyUI's stock LoraLoader logs "lora key not loaded" for every key; LTLoraLoader applies it.
Not trained: for the foreign_lora example workflow and tests. Deterministic (same seed, same file).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny_transformers import TINY_ZIMAGE_CONFIG

FILE_NAME = "tiny-random-zimage-lora-diffusers.safetensors"
RANK = 4


def tiny_zimage_lora(seed: int = 0, rank: int = RANK) -> dict[str, torch.Tensor]:
    """PEFT-layout LoRA tensors sized for ``TINY_ZIMAGE_CONFIG`` (deltas ~ half the weights' scale)."""
    cfg = TINY_ZIMAGE_CONFIG
    dim = cfg["dim"]
    kv = cfg["n_kv_heads"] * (dim // cfg["n_heads"])
    hidden = int(dim / 3 * 8)  # diffusers' Z-Image FFN width
    shapes = {
        "attention.to_q": (dim, dim),
        "attention.to_k": (kv, dim),
        "attention.to_v": (kv, dim),
        "attention.to_out.0": (dim, dim),
        "feed_forward.w1": (hidden, dim),
        "feed_forward.w2": (dim, hidden),
        "feed_forward.w3": (hidden, dim),
    }
    stacks = {
        "layers": cfg["n_layers"],
        "noise_refiner": cfg["n_refiner_layers"],
        "context_refiner": cfg["n_refiner_layers"],
    }
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for stack, count in stacks.items():
        for index in range(count):
            for module, (rows, cols) in shapes.items():
                name = f"transformer.{stack}.{index}.{module}"
                out[f"{name}.lora_A.weight"] = torch.randn(rank, cols, generator=generator) / cols**0.5
                out[f"{name}.lora_B.weight"] = 0.5 * torch.randn(rows, rank, generator=generator) / rank**0.5
    return out


def write_tiny_loras(models_dir: Path, seed: int = 0) -> Path:
    """Write the tiny LoRA under ``models_dir/loras/`` (temp file + rename); returns its path."""
    import safetensors.torch

    path = Path(models_dir) / "loras" / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    meta = {
        "lumina_turbo": "tiny random test LoRA, not trained",
        "layout": "diffusers/PEFT",
        "seed": str(seed),
    }
    safetensors.torch.save_file(tiny_zimage_lora(seed), str(tmp), metadata=meta)
    tmp.replace(path)
    return path
