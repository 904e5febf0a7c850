"""A tiny synthetic concept data set (images + captions) for tests, benchmarks and the example workflow.

The "concept": a two-colour split image (red left, blue right) with small per-image variations, and
the caption "a photo of ltconcept". Deterministic from the seed; written atomically per file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

CONCEPT_CAPTION = "a photo of ltconcept"


def concept_image(index: int, size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed * 1000 + index)
    width, height = size
    image = np.zeros((height, width, 3), dtype=np.float32)
    image[:, : width // 2] = (0.85, 0.1, 0.1)
    image[:, width // 2 :] = (0.1, 0.15, 0.85)
    image *= rng.uniform(0.9, 1.1)
    image += rng.normal(0.0, 0.03, image.shape)
    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))


def solid_image(colour: tuple[float, float, float], size=(64, 64)) -> Image.Image:
    array = np.broadcast_to(np.asarray(colour, dtype=np.float32), (size[1], size[0], 3))
    return Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))


def _write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_image(folder: Path, name: str, image: Image.Image, caption: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    _write(path, lambda tmp: image.save(tmp, format="PNG"))
    _write(path.with_suffix(".txt"), lambda tmp: tmp.write_text(caption, encoding="utf-8"))
    return path


def write_concept_dataset(
    folder, count: int = 4, size=(64, 64), seed: int = 0, caption: str = CONCEPT_CAPTION
) -> Path:
    """``count`` concept images with captions in ``folder``; returns the folder."""
    folder = Path(folder)
    for index in range(count):
        write_image(folder, f"concept_{index:02d}", concept_image(index, size, seed), caption)
    return folder


def install_example(input_dir, name: str = "lumina_turbo_example") -> Path:
    """The example workflow's data set under ComfyUI's input/ folder (skipped when already there)."""
    folder = Path(input_dir) / name
    if not (folder / "concept_03.txt").is_file():
        write_concept_dataset(folder, count=4)
    return folder
