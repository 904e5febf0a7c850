"""Render a SIGMAS schedule as a labelled line chart (sigma against step) for an IMAGE output.

Drawn with PIL (matplotlib is not a ComfyUI requirement) at 2x and downsampled, so lines are smooth
and text is crisp. Works headless and in API mode: the picture is an ordinary IMAGE tensor
(1, H, W, 3), float32 in [0, 1]. ComfyUI sigma convention on the y axis (1 = noise, 0 = data).
No node here; the schedule nodes call :func:`sigma_plot`.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 640, 400
_SCALE = 2  # supersampling factor
_BACKGROUND = (255, 255, 255)
_AXIS = (40, 40, 40)
_GRID = (225, 225, 225)
_LINE = (31, 119, 180)
_REFERENCE = (170, 170, 170)
_TEXT = (20, 20, 20)
_MARKER_LIMIT = 60  # draw point markers up to this many steps
_VALUE_LABEL_LIMIT = 12  # write each sigma next to its point up to this many steps


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size * _SCALE)


def _step_ticks(steps: int) -> list[int]:
    for stride in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000):
        if steps / stride <= 10:
            return list(range(0, steps + 1, stride))
    return [0, steps]


def sigma_plot(
    sigmas: torch.Tensor,
    title: str,
    reference: torch.Tensor | None = None,
    labels: tuple[str, str] | None = None,
) -> torch.Tensor:
    """An IMAGE (1, HEIGHT, WIDTH, 3) of ``sigmas`` (ComfyUI sigma, 1 = noise) against step index.

    ``reference``: a second schedule of the same length drawn in grey underneath (e.g. the model's
    default one); ``labels``: legend texts of (sigmas, reference).
    """
    s = _SCALE
    image = Image.new("RGB", (WIDTH * s, HEIGHT * s), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 64 * s, (WIDTH - 20) * s, 44 * s, (HEIGHT - 50) * s
    title_size = 14
    while title_size > 8 and draw.textlength(title, font=_font(title_size)) > (WIDTH - 16) * s:
        title_size -= 1  # long titles (Flux shift, denoise) shrink instead of being clipped
    draw.text(((WIDTH // 2) * s, 14 * s), title, fill=_TEXT, font=_font(title_size), anchor="mt")
    values = [float(v) for v in sigmas.flatten().tolist()]
    steps = max(len(values) - 1, 1)
    y_max = max([1.0] + values)

    def to_xy(index: float, sigma: float) -> tuple[float, float]:
        return (left + (right - left) * index / steps, bottom - (bottom - top) * sigma / y_max)

    label_font = _font(11)
    for k in range(0, 11, 2):  # horizontal grid and y labels every 0.2 (of y_max)
        sigma = y_max * k / 10
        _, y = to_xy(0, sigma)
        draw.line([(left, y), (right, y)], fill=_GRID, width=s)
        draw.text((left - 6 * s, y), f"{sigma:.1f}", fill=_TEXT, font=label_font, anchor="rm")
    for tick in _step_ticks(steps):
        x, _ = to_xy(tick, 0)
        draw.line([(x, top), (x, bottom)], fill=_GRID, width=s)
        draw.text((x, bottom + 6 * s), str(tick), fill=_TEXT, font=label_font, anchor="mt")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_AXIS, width=2 * s)
    draw.text(((left + right) // 2, bottom + 26 * s), "step", fill=_TEXT, font=_font(12), anchor="mt")
    axis_label = Image.new("RGB", (200 * s, 18 * s), _BACKGROUND)
    ImageDraw.Draw(axis_label).text(
        (100 * s, 9 * s), "sigma (1 = noise)", fill=_TEXT, font=_font(12), anchor="mm"
    )
    rotated = axis_label.rotate(90, expand=True)
    image.paste(rotated, (8 * s, (top + bottom) // 2 - rotated.height // 2))

    if len(values) < 2:
        draw.text(
            ((left + right) // 2, (top + bottom) // 2),
            "empty schedule (denoise 0)",
            fill=_TEXT,
            font=_font(14),
            anchor="mm",
        )
    else:
        if reference is not None and reference.numel() == len(values):
            reference_points = [to_xy(i, float(v)) for i, v in enumerate(reference.flatten().tolist())]
            draw.line(reference_points, fill=_REFERENCE, width=2 * s, joint="curve")
        if labels is not None:
            for row, (text, colour) in enumerate(zip(labels, (_LINE, _REFERENCE), strict=True)):
                y = top + (8 + 16 * row) * s
                draw.line([(right - 150 * s, y), (right - 126 * s, y)], fill=colour, width=3 * s)
                draw.text((right - 120 * s, y), text, fill=_TEXT, font=_font(11), anchor="lm")
        points = [to_xy(i, v) for i, v in enumerate(values)]
        draw.line(points, fill=_LINE, width=3 * s, joint="curve")
        if len(values) - 1 <= _MARKER_LIMIT:
            radius = 4 * s
            for x, y in points:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=_LINE)
        if len(values) - 1 <= _VALUE_LABEL_LIMIT:
            for (x, y), value in zip(points, values, strict=True):
                if value in (0.0, 1.0):
                    continue  # the exact endpoints speak for themselves
                draw.text((x + 6 * s, y - 4 * s), f"{value:.3f}", fill=_TEXT, font=_font(10), anchor="lb")

    image = image.resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
