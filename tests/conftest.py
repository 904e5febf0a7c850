"""Shared fixtures: ComfyUI host, server and browser fixtures from the development folder.

``make setup`` makes this repository importable as ``lumina_turbo`` (through its link in
``.comfyui/custom_nodes``), exactly as ComfyUI's custom-node loader imports it.
"""

pytest_plugins = ["lumina_turbo.devtools.harness", "lumina_turbo.devtools.browser_harness"]


def pytest_collection_modifyitems(config, items):
    """Browser tests last: they share one Chromium for the rest of the session, and the slowest
    layer then reports after the fast ones."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)
