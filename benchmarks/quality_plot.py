"""The training-quality plot (PIL only): held-out velocity gap closed vs optimizer steps, one panel per family,
one line per configuration (mean over seeds, bars from min to max)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0),
]  # fmt: skip
PANEL_W, PANEL_H, MARGIN, LEGEND_W = 560, 380, 60, 330


def write_plot(summary: dict, path: Path) -> Path:
    font = ImageFont.load_default()
    families = list(summary)
    image = Image.new("RGB", (len(families) * PANEL_W + LEGEND_W, PANEL_H + 40), "white")
    draw = ImageDraw.Draw(image)
    names: list[str] = []
    for family in families:
        names += [
            n
            for n in summary[family]
            if isinstance(summary[family][n], dict) and "curve" in summary[family][n]
        ]
    names = list(dict.fromkeys(names))
    colour = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(names)}
    for panel, family in enumerate(families):
        left, top = panel * PANEL_W + MARGIN, 30
        width, height = PANEL_W - MARGIN - 20, PANEL_H - 70
        max_step = max(p["step"] for n in names if n in summary[family] for p in summary[family][n]["curve"])
        values = [
            v
            for n in names
            if n in summary[family]
            for point in summary[family][n]["curve"]
            for v in (point["min"], point["max"])
        ]
        # each panel zoomed to its own range: the 100 % line may be off it
        low, high = min(0.0, min(values)), max(0.1, 1.15 * max(values))

        def xy(
            step, value, left=left, top=top, width=width, height=height, max_step=max_step, low=low, high=high
        ):
            return (left + width * step / max_step, top + height * (1 - (value - low) / (high - low)))

        draw.rectangle([left, top, left + width, top + height], outline="black")
        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            value = low + frac * (high - low)
            _, y = xy(0, value)
            draw.line([left - 4, y, left, y], fill="black")
            draw.text((left - 44, y - 6), f"{100 * value:.0f} %", fill="black", font=font)
        for step in (0, max_step // 3, 2 * max_step // 3, max_step):
            x, _ = xy(step, low)
            draw.line([x, top + height, x, top + height + 4], fill="black")
            draw.text((x - 8, top + height + 8), str(step), fill="black", font=font)
        _, zero = xy(0, 0.0)
        draw.line([left, zero, left + width, zero], fill=(200, 200, 200))
        if high >= 1.0:
            _, full = xy(0, 1.0)
            draw.line([left, full, left + width, full], fill=(200, 200, 200))
        draw.text(
            (left, 8), f"{family}: held-out velocity gap closed (B = 0 %, teacher = 100 %)", fill="black"
        )
        draw.text((left + width // 2 - 40, top + height + 24), "optimizer steps", fill="black", font=font)
        for name in names:
            if name not in summary[family]:
                continue
            curve = [{"step": 0, "mean": 0.0, "min": 0.0, "max": 0.0}, *summary[family][name]["curve"]]
            points = [xy(p["step"], p["mean"]) for p in curve]
            draw.line(points, fill=colour[name], width=2)
            for p in curve[1:]:
                x, y_low = xy(p["step"], p["min"])
                _, y_high = xy(p["step"], p["max"])
                draw.line([x, y_low, x, y_high], fill=colour[name], width=1)
    legend_left = len(families) * PANEL_W + 10
    for i, name in enumerate(names):
        y = 40 + 18 * i
        draw.line([legend_left, y + 6, legend_left + 20, y + 6], fill=colour[name], width=3)
        label = next(summary[f][name]["label"] for f in families if name in summary[f])
        draw.text((legend_left + 26, y), label[:52], fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
