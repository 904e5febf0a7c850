"""The one error type loaders raise for a file that is not what it should be."""

from __future__ import annotations

from pathlib import Path


class ModelFileError(ValueError):
    """A model file or folder is missing, corrupt, or not the architecture expected.

    The message names the file and what was expected, so the user can fix it without a traceback.
    """

    def __init__(self, path: str | Path, expected: str, detail: str = ""):
        self.path = str(path)
        message = f"{self.path}: expected {expected}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)
