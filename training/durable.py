"""Writes that survive a crash or power loss: data flushed to disk before the rename that publishes it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_file(path) -> None:
    """Flush ``path``'s data to the disk (a rename alone can publish a file whose data never landed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(path) -> None:
    """Flush a folder entry (the rename itself); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp, path, *, previous=None) -> None:
    """Make the fully written ``tmp`` the file ``path``, durably.

    ``previous``: where the file ``path`` held until now is kept (replacing an older one). ``path``
    exists at every moment: the old file is linked (or copied) to ``previous`` before ``tmp`` is
    renamed over it.
    """
    tmp, path = Path(tmp), Path(path)
    fsync_file(tmp)
    if previous is not None and path.is_file():
        previous = Path(previous)
        staging = previous.with_name(f".{previous.name}.tmp")
        staging.unlink(missing_ok=True)
        try:
            os.link(path, staging)
        except OSError:  # file systems without hard links
            shutil.copyfile(path, staging)
            fsync_file(staging)
        os.replace(staging, previous)
    os.replace(tmp, path)
    fsync_folder(path.parent)
