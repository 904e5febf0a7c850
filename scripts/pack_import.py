"""Make this repository importable as the package ``lumina_turbo`` (whatever its folder is called).

Used by scripts/convert_lora.py, which a user runs from their clone; inside ComfyUI the pack is
imported by ComfyUI's own custom-node loader, and in the development environment (.venv) through its
link in .comfyui/custom_nodes.
"""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def register_pack():
    if "lumina_turbo" in sys.modules:
        return sys.modules["lumina_turbo"]
    spec = importlib.util.spec_from_file_location(
        "lumina_turbo", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["lumina_turbo"] = module
    spec.loader.exec_module(module)
    return module
