"""Test setup: the repository is importable as the package ``lumina_turbo`` whatever its folder is called."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _register_package():
    if "lumina_turbo" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "lumina_turbo", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["lumina_turbo"] = module
    spec.loader.exec_module(module)


_register_package()
