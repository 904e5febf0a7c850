"""Aspect-ratio buckets: each image is resized to cover the bucket of nearest aspect ratio and centre-cropped.

Buckets (kohya's scheme): every (width, height) with both sides multiples of ``step`` and
width * height <= resolution^2, the larger side as large as fits, aspect ratio within
``max_aspect_ratio``. An image goes to the bucket whose log aspect ratio is nearest (ties: the larger
area). With buckets off every image is a resolution x resolution centre crop.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageOps


def bucket_sizes(resolution: int, step: int, max_aspect_ratio: float = 4.0) -> list[tuple[int, int]]:
    """All (width, height) buckets for ``resolution`` (pixels), sorted by width."""
    area = resolution * resolution
    sizes = set()
    width = step
    while width <= resolution * max_aspect_ratio:
        height = (area // width) // step * step
        if height >= step and max(width, height) / min(width, height) <= max_aspect_ratio + 1e-9:
            sizes.add((width, height))
        width += step
    square = (resolution // step * step,) * 2
    sizes.add(square)
    return sorted(sizes)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest to width/height (log scale); ties go to the larger area."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 9), -b[0] * b[1]))


def target_size(
    width: int, height: int, *, resolution: int, step: int, enable_bucket: bool, max_aspect_ratio: float
) -> tuple[int, int]:
    if not enable_bucket:
        side = resolution // step * step
        return side, side
    return nearest_bucket(width, height, bucket_sizes(resolution, step, max_aspect_ratio))


def load_image(path) -> Image.Image:
    """RGB image with EXIF orientation applied (what a viewer shows)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


def fit_to_bucket(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize to cover ``size`` (Lanczos) and centre-crop; returns [1, H, W, 3] float in [0, 1] (ComfyUI IMAGE)."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.LANCZOS
    )
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0)[None]
