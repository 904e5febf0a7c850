"""Every node of the pack, registered through one ComfyExtension."""

from comfy_api.latest import ComfyExtension, io

from .loaders import LTModelLoader

NODES: list[type[io.ComfyNode]] = [
    LTModelLoader,
]


class LuminaTurboExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
