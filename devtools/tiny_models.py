"""Write the tiny random demo/test models under a ComfyUI models/ folder (default: .comfyui/models).

Skips the work when the files were written by the same factory code (a stamp of its sources).
Usage: python -m lumina_turbo.devtools.tiny_models [MODELS_DIR]
"""

import hashlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FACTORY_SOURCES = [
    "devtools/tiny_factory.py",
    "devtools/tiny_transformers.py",
    "loading/nextdit_keys.py",
    "devtools/tiny_lora.py",
]


def factory_stamp() -> str:
    digest = hashlib.sha256()
    for name in FACTORY_SOURCES:
        digest.update((REPO / name).read_bytes())
    return digest.hexdigest()[:16]


def _all_present(models_dir: Path) -> bool:
    """Every file and folder the factory writes is still there (a user may have deleted one)."""
    from lumina_turbo.devtools.tiny_factory import FAMILIES, file_names
    from lumina_turbo.devtools.tiny_lora import FILE_NAME as TINY_LORA_NAME

    paths = [models_dir / name for family in FAMILIES for name in file_names(family).values()]
    return all(path.exists() for path in paths) and (models_dir / "loras" / TINY_LORA_NAME).is_file()


def install(models_dir: Path) -> Path:
    from lumina_turbo.devtools.example_dataset import install_example

    install_example(models_dir.parent / "input")  # the LoRA-training example's images + captions
    stamp_file = models_dir / ".tiny-random-models"
    stamp = factory_stamp()
    if stamp_file.is_file() and stamp_file.read_text() == stamp and _all_present(models_dir):
        return models_dir
    from lumina_turbo.devtools.comfy_host import bootstrap

    bootstrap()
    from lumina_turbo.devtools.tiny_factory import write_all
    from lumina_turbo.devtools.tiny_lora import write_tiny_loras

    print(f"[tiny models] writing tiny-random-* models into {models_dir}", flush=True)
    write_all(models_dir)
    write_tiny_loras(models_dir)
    stamp_file.write_text(stamp)
    return models_dir


if __name__ == "__main__":
    install(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / ".comfyui" / "models")
