"""Shared fixtures. The repository is importable as ``lumina_turbo``; ComfyUI fixtures live in harness.py."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pack_import import register_pack  # noqa: E402

register_pack()

from browser_harness import clean_page, comfy_page  # noqa: E402, F401
from harness import comfy_host, comfy_server, tiny_models  # noqa: E402, F401


def pytest_collection_modifyitems(config, items):
    """Browser tests last: they share one Chromium for the rest of the session, and the slowest
    layer then reports after the fast ones."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)
