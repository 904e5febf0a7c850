"""Import the pinned ComfyUI host (``.comfyui/``) into this process, on the CPU.

Call :func:`bootstrap` before importing anything from ComfyUI. It mirrors what ``main.py`` does
before it loads nodes, without parsing pytest's command line as ComfyUI arguments.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFY_DIR = REPO / ".comfyui"

_done = False


def bootstrap():
    global _done
    if _done:
        return
    if not (COMFY_DIR / "main.py").is_file():
        raise RuntimeError(f"The pinned ComfyUI host is missing at {COMFY_DIR}: run `make setup` first.")
    if str(COMFY_DIR) not in sys.path:
        sys.path.insert(0, str(COMFY_DIR))
    # ComfyUI's `utils` package must win over comfy/utils.py, which nodes.py later puts on sys.path.
    import utils.extra_config  # noqa: F401
    from comfy.cli_args import args

    args.cpu = True
    args.disable_api_nodes = True
    import comfy.model_management  # noqa: F401  (reads args at import)

    _done = True
