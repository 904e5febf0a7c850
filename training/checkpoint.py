"""Training checkpoints: everything an exact resume needs, written atomically.

One file ``training_state.pt`` per run folder (torch.save of plain tensors and Python values, loaded
with ``weights_only=True``): the LoRA tensors, the optimizer and LR-schedule state, the trainer's
torch.Generator state, the replay buffer, the loss history, the step counters, and the identity of the
run (config fields that shape the trajectory, the dataset key, the model fingerprint). A checkpoint
is always a state *between* optimizer steps; it is written to a temporary file, flushed to the disk
and renamed over the previous one, so a crash while writing leaves the last good checkpoint in place.
The checkpoint before it is kept as ``training_state.previous.pt``; when the newest cannot be read
(a disk that lost it, a copy cut short), resuming falls back to that one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from .config import CHECKPOINT_FORMAT
from .durable import publish

CHECKPOINT_NAME = "training_state.pt"
PREVIOUS_NAME = "training_state.previous.pt"
log = logging.getLogger("lumina_turbo.training")
VERSION = 1


class CheckpointMismatch(ValueError):
    """The checkpoint belongs to a different run (config, dataset or model); the message lists what differs."""


def checkpoint_path(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def previous_checkpoint_path(run_dir) -> Path:
    return Path(run_dir) / PREVIOUS_NAME


def save_checkpoint(run_dir, state: dict) -> Path:
    path = checkpoint_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        torch.save({"format": CHECKPOINT_FORMAT, "version": VERSION, **state}, tmp)
        publish(tmp, path, previous=previous_checkpoint_path(run_dir))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(run_dir) -> dict | None:
    """The checkpoint of ``run_dir``, or None when there is none; the previous one if the newest is unreadable."""
    path = checkpoint_path(run_dir)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        previous = previous_checkpoint_path(run_dir)
        try:
            state = torch.load(previous, map_location="cpu", weights_only=True)
        except Exception:
            raise CheckpointMismatch(
                f"checkpoint {path} cannot be read ({exc}); delete it or set resume = false"
            ) from exc
        log.warning(
            "lumina_turbo: checkpoint %s cannot be read (%s); resuming from the previous one, %s",
            path,
            exc,
            previous,
        )
        path = previous
    if (
        not isinstance(state, dict)
        or state.get("format") != CHECKPOINT_FORMAT
        or state.get("version") != VERSION
    ):
        raise CheckpointMismatch(
            f"checkpoint {path} is not a lumina_turbo training checkpoint (version {VERSION})"
        )
    return state


def check_identity(state: dict, identity: dict, path) -> None:
    """Raise CheckpointMismatch naming every field whose value differs from the checkpoint's."""
    saved = state.get("identity", {})
    differing = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if differing:
        details = "; ".join(
            f"{k}: checkpoint {_short(saved.get(k))}, now {_short(identity.get(k))}" for k in differing[:6]
        )
        raise CheckpointMismatch(
            f"checkpoint {path} belongs to a different run ({details}). Use a new run name, set resume = false, "
            "or restore those settings to continue it."
        )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
