"""Find the training images and their captions: a folder of images with same-name .txt files.

kohya/sd-scripts layout accepted: sub-folders named ``N_name`` repeat their images N times (other
sub-folders count once); images directly in the folder repeat ``num_repeats`` times. Every image
needs its caption file: a missing one is an error that lists the images, never a silent empty
caption (ComfyUI's LoadImageTextDataSetFromFolder trains those with "").
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


class DatasetError(ValueError):
    """The dataset folder cannot be used as it is; the message says what to fix."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str
    repeats: int


def resolve_folder(folder: str, input_dir: str | os.PathLike | None) -> Path:
    """An absolute path as given, else a path relative to ComfyUI's input/ folder."""
    if not isinstance(folder, str) or not folder.strip():
        raise DatasetError("folder: empty; give a folder under ComfyUI's input/ folder or an absolute path")
    path = Path(folder.strip()).expanduser()
    if not path.is_absolute():
        if input_dir is None:
            raise DatasetError(
                f"folder: {folder!r} is relative but there is no input folder to resolve it against"
            )
        path = Path(input_dir) / path
    if not path.is_dir():
        raise DatasetError(
            f"folder: {path} does not exist or is not a folder (expected images with .txt captions)"
        )
    return path


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_folder(root: Path, *, num_repeats: int = 1, caption_extension: str = ".txt") -> list[ImageRecord]:
    """Every image under ``root`` (and its first-level sub-folders) with its caption and repeat count."""
    root = Path(root)
    found: list[tuple[Path, int]] = [(p, num_repeats) for p in _images_in(root)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = _REPEAT_FOLDER.match(sub.name)
        repeats = int(match.group(1)) if match else 1
        if repeats < 1:
            raise DatasetError(f"folder: {sub} asks for {repeats} repeats; use N_name with N >= 1")
        found.extend((p, repeats) for p in _images_in(sub))
    if not found:
        raise DatasetError(
            f"folder: {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) directly or in its sub-folders"
        )
    missing = [p for p, _ in found if not p.with_suffix(caption_extension).is_file()]
    if missing:
        names = ", ".join(str(p.relative_to(root)) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetError(
            f"folder: {len(missing)} image(s) have no caption file ({caption_extension} with the same name): "
            f"{names}{more}"
        )
    records = []
    for path, repeats in found:
        caption_file = path.with_suffix(caption_extension)
        try:
            caption = caption_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as exc:
            raise DatasetError(
                f"folder: caption {caption_file.relative_to(root)} is not UTF-8 text (byte {exc.start}); "
                "save it as UTF-8"
            ) from None
        records.append(ImageRecord(path=path, caption=caption, repeats=repeats))
    return records


def folder_fingerprint(records: list[ImageRecord]) -> list[tuple[str, int, int, str, int]]:
    """Cheap change detector (name, size, mtime, caption, repeats) for ComfyUI's node cache."""
    out = []
    for record in records:
        stat = record.path.stat()
        out.append((str(record.path), stat.st_size, stat.st_mtime_ns, record.caption, record.repeats))
    return out
