"""Lumina Turbo: faster sampling, LoRA training and loaders for Lumina-Image-2.0 and Z-Image."""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    # Imported here so that samplers/ and losses/ stay importable without ComfyUI.
    from .nodes import LuminaTurboExtension
    from .nodes.routes import register_server_routes
    from .patches.stock_lists import register_stock_names

    register_stock_names()
    register_server_routes()
    return LuminaTurboExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
