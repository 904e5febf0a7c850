"""Import the pinned ComfyUI host (``.comfyui/``) into this process, on the CPU.

Call :func:`bootstrap` before importing anything from ComfyUI. It mirrors what ``main.py`` does
before it loads nodes, without parsing pytest's command line as ComfyUI arguments.
"""

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
    from ..training.cli import bootstrap_comfyui

    bootstrap_comfyui(COMFY_DIR, cpu=True)
    from comfy.cli_args import args

    args.disable_api_nodes = True
    _done = True
