"""Every node of the pack, registered through one ComfyExtension.

Each module in this package lists its node classes in a module-level ``NODES``; adding a module is
all it takes to register its nodes.
"""

import importlib
import pkgutil

from comfy_api.latest import ComfyExtension, io


def all_nodes() -> list[type[io.ComfyNode]]:
    found: list[type[io.ComfyNode]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(getattr(module, "NODES", []))
    return found


class LuminaTurboExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()
