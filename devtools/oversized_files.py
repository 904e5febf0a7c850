"""Safetensors files whose header declares tensors far larger than the disk they take (sparse files).

A header may declare gigabytes; safetensors' own parser accepts it as long as the file is that long,
and a sparse file is, without using the disk. Loading such a file would allocate every declared byte:
the bad-input tests use these files to prove that the pack refuses them from the header.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_SIZES = {"F32": 4, "F16": 2, "BF16": 2}


def write_with_declared(path: Path, tensors: dict[str, torch.Tensor], declared: dict[str, tuple]) -> Path:
    """Write ``tensors`` for real, then ``declared`` (name -> (dtype name, shape)) as zeros that only
    the file's length holds."""
    header, blobs, offset = {}, [], 0
    for name, tensor in tensors.items():
        data = tensor.contiguous().cpu().numpy().tobytes()
        header[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    for name, (dtype, shape) in declared.items():
        size = _SIZES[dtype] * int(torch.Size(shape).numel())
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in blobs:
            f.write(data)
        f.truncate(8 + len(text) + offset)  # the declared tensors: a hole, no disk used
    return Path(path)
