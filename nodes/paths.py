"""The one path policy for every path that comes from a prompt or an HTTP request.

A prompt is untrusted input (servers run with ``--listen``). Every path it names is resolved, symlinks
included, and must lie inside the ComfyUI folder it belongs to: input/ for training datasets, output/
for caches and training runs, the model folders (models/loras/, ...) for files the pack writes there.
The check runs where the path is used (``execute``), since linked values never reach
``validate_inputs``. Errors name the input and the rule, never what a folder outside holds.

Training from folders elsewhere is a server-side opt-in, never a prompt value: the environment
variable ``LUMINA_TURBO_TRAINING_ROOTS`` (absolute folders separated by ``os.pathsep``, ':' on Linux
and macOS, ';' on Windows) adds roots where datasets and caches may also lie. The headless CLI reads
the user's own TOML on the user's own machine and does not use this module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import folder_paths

TRAINING_ROOTS_ENV = "LUMINA_TURBO_TRAINING_ROOTS"


class PathRefused(ValueError):
    """A path from a prompt that leaves the folders it may use; the message names the input."""


def training_roots() -> list[Path]:
    """The extra dataset/cache roots this server allows (LUMINA_TURBO_TRAINING_ROOTS), resolved."""
    roots = []
    for part in os.environ.get(TRAINING_ROOTS_ENV, "").split(os.pathsep):
        part = part.strip()
        if part and os.path.isabs(part):  # a relative root would depend on the server's working folder
            roots.append(Path(part).resolve())
    return roots


def is_inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def contained(value, input_name: str, base: str | Path, roots: Sequence[str | Path], rule: str) -> Path:
    """``value`` (relative to ``base``, or absolute) resolved with its symlinks; PathRefused unless it
    lies inside one of ``roots`` (resolved too). ``rule`` says where the input may point."""
    if not isinstance(value, str) or not value.strip():
        raise PathRefused(f"{input_name}: empty; expected {rule}")
    if "\x00" in value:
        raise PathRefused(f"{input_name}: contains a NUL character; expected {rule}")
    path = Path(value.strip())  # no expanduser: '~' would be the server's home
    if not path.is_absolute():
        path = Path(base) / path
    resolved = path.resolve()
    if not any(is_inside(resolved, Path(root).resolve()) for root in roots):
        raise PathRefused(f"{input_name}: {value!r} is outside the folders it may use; expected {rule}")
    return resolved


def _opt_in_hint() -> str:
    return f" (the server may allow more folders with {TRAINING_ROOTS_ENV})"


def dataset_folder(value) -> Path:
    """A training dataset folder: under input/, or under a root the server allows."""
    input_dir = folder_paths.get_input_directory()
    return contained(
        value,
        "folder",
        input_dir,
        [input_dir, *training_roots()],
        "a folder under ComfyUI's input/ folder" + _opt_in_hint(),
    )


def cache_folder(value) -> Path:
    """A latent/text cache folder: under output/, or under a root the server allows."""
    output_dir = folder_paths.get_output_directory()
    return contained(
        value,
        "cache_dir",
        output_dir,
        [output_dir, *training_roots()],
        "a folder under ComfyUI's output/ folder" + _opt_in_hint(),
    )


def check_files_inside(paths, input_name: str) -> None:
    """PathRefused if any of ``paths`` (files found in a checked dataset folder) resolves outside
    input/ and the allowed training roots through a symlink; the message does not list them."""
    roots = [Path(folder_paths.get_input_directory()).resolve(), *training_roots()]
    outside = sum(1 for p in paths if not any(is_inside(Path(p).resolve(), r) for r in roots))
    if outside:
        raise PathRefused(
            f"{input_name}: {outside} file(s) in the folder link outside the folders it may use"
            + _opt_in_hint()
        )


def plain_file_name(value, input_name: str) -> str:
    """A bare file name (no folder part, not hidden, not '..'); PathRefused otherwise."""
    if not isinstance(value, str):
        raise PathRefused(f"{input_name}: expected a file name, got {type(value).__name__}")
    if "/" in value or "\\" in value or os.sep in value or value.startswith(".") or "\x00" in value:
        raise PathRefused(
            f"{input_name}: expected a plain file name (no folders, not starting with '.'), got {value!r}"
        )
    return value


def model_folder_file(kind: str, path: str | Path, input_name: str) -> Path:
    """``path`` (a file the pack is about to write) resolved inside one of ComfyUI's ``kind`` folders
    (e.g. "loras"); PathRefused where a symlink would carry the write outside."""
    roots = folder_paths.get_folder_paths(kind)
    resolved = Path(path).resolve()
    if not any(is_inside(resolved, Path(root).resolve()) for root in roots):
        raise PathRefused(
            f"{input_name}: the file would be written outside models/{kind}/ (through a symlink?)"
        )
    return resolved


def output_subfolder(*parts: str, input_name: str) -> Path:
    """``output/<parts...>`` resolved; PathRefused where a symlink carries it outside output/."""
    output_dir = Path(folder_paths.get_output_directory())
    resolved = output_dir.joinpath(*parts).resolve()
    if not is_inside(resolved, output_dir.resolve()):
        raise PathRefused(
            f"{input_name}: the folder would lie outside ComfyUI's output/ folder (through a symlink?)"
        )
    return resolved
