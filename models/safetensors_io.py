"""Reading safetensors files and sharded folders with clear errors and no double copies."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ModelFileError


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of one file; a missing, truncated or corrupt file raises ModelFileError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "a .safetensors file", "it does not exist")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ModelFileError(path, "a complete, valid .safetensors file", str(exc)) from exc


def load_folder_state_dict(folder: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Merge the shards of a ``save_pretrained`` folder (index json or a single file).

    Shards are read one after another into one dict, so peak memory is the model plus one
    tensor, never two copies of the model.
    """
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ModelFileError(indexes[0], "a shard index json with a 'weight_map'", str(exc)) from exc
        shard_names = sorted(set(weight_map.values()))
        missing = [name for name in shard_names if not (folder / name).is_file()]
        if missing:
            raise ModelFileError(folder / missing[0], f"shard listed in {indexes[0].name}", "it does not exist")
        sd: dict[str, torch.Tensor] = {}
        for name in shard_names:
            sd.update(load_safetensors(folder / name, device))
        absent = sorted(set(weight_map) - set(sd))
        if absent:
            raise ModelFileError(folder / weight_map[absent[0]], f"tensor {absent[0]!r} (listed in the index)")
        return sd
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise ModelFileError(folder, "one .safetensors file or a *.safetensors.index.json", f"found: {found}")
    return load_safetensors(files[0], device)
