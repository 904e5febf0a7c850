"""Reading safetensors files and sharded folders with clear errors and without holding a model twice.

Tensors are read with positioned reads straight into freshly allocated memory (big ones in chunks
on a few threads), not through a memory map: pages of a mapped file count in the process's resident
memory for as long as any tensor views them, so a mapped load followed by a copy into the model
holds it twice (what ComfyUI's own loader does). Here each tensor's bytes are in memory once (plus
a few small chunks while its dtype is converted), and a folder's shards are read one after another into
one dict. (The format is little-endian, like every machine ComfyUI runs on.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import ModelFileError

READ_THREADS = 4  # like a parallel copy: page faults and copies of big tensors spread over cores
READ_CHUNK = 16 << 20
CONVERT_CHUNK = 4 << 20  # stored bytes converted at a time when the dtype changes
HAS_PREADV = hasattr(os, "preadv")  # not on Windows: there tensors are read one after another
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class TensorInfo(NamedTuple):
    """Where one tensor lies in a file: dtype, shape and absolute byte range."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Name -> TensorInfo of every tensor in a file, checked against the file's size.

    safetensors' own parser validates the header first (JSON, offsets covering the file exactly),
    so a truncated or corrupt file raises ModelFileError naming it before anything is read.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "a .safetensors file", "it does not exist")
    try:
        with safe_open(str(path), framework="pt"):
            pass
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(path, "a complete, valid .safetensors file", str(exc)) from exc
    header.pop("__metadata__", None)
    infos = {}
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise ModelFileError(
                path, f"tensors of a dtype in {sorted(DTYPES)}", f"{name!r} is {entry['dtype']}"
            )
        begin, end = entry["data_offsets"]
        infos[name] = TensorInfo(
            DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + header_len + begin, 8 + header_len + end
        )
    return infos


def _pread_into(f, view: memoryview, offset: int) -> None:
    filled = 0
    while filled < len(view):  # one call returns at most ~2 GiB on Linux
        if HAS_PREADV:  # positioned reads: safe from several threads at once
            count = os.preadv(f.fileno(), [view[filled:]], offset + filled)
        else:
            f.seek(offset + filled)
            count = f.readinto(view[filled:])
        if not count:
            raise OSError(f"unexpected end of file at byte {offset + filled}")
        filled += count


def _read_tensor(f, info: TensorInfo, pool: ThreadPoolExecutor | None) -> torch.Tensor:
    """The tensor's bytes in new memory; large ones in chunks read in parallel (like a parallel copy)."""
    size = info.end - info.start
    buffer = torch.empty(size, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    starts = range(0, size, READ_CHUNK)
    if pool is None or len(starts) < 2:
        _pread_into(f, view, info.start)
    else:
        jobs = [pool.submit(_pread_into, f, view[s : s + READ_CHUNK], info.start + s) for s in starts]
        for job in jobs:
            job.result()
    return buffer.view(info.dtype).reshape(info.shape)


def _read_converted(f, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """The tensor in ``dtype``, converted chunk by chunk as it is read: a narrower result (fp8 from bf16)
    never holds the whole tensor in its stored dtype as well. One thread: chunks freed by other
    threads would stay in their malloc arenas, counted in the process's memory."""
    out = torch.empty(info.shape, dtype=dtype)
    flat = out.view(-1)
    itemsize = torch.empty((), dtype=info.dtype).element_size()
    per_chunk = max(1, CONVERT_CHUNK // itemsize)
    buffer = torch.empty(min(per_chunk, info.numel) * itemsize, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    for first in range(0, info.numel, per_chunk):
        count = min(per_chunk, info.numel - first)
        _pread_into(f, view[: count * itemsize], info.start + first * itemsize)
        flat[first : first + count].copy_(buffer[: count * itemsize].view(info.dtype))
    return out


def iter_safetensors(
    path: str | Path, dtype: torch.dtype | None = None, names: Collection[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs in file order, only ``names`` if given; floating tensors converted to
    ``dtype`` while they are read."""
    path = Path(path)
    infos = read_header(path)
    if names is not None:
        infos = {name: info for name, info in infos.items() if name in names}
    threads = min(READ_THREADS, os.cpu_count() or 1) if HAS_PREADV else 1
    converted = False
    try:
        with (
            open(path, "rb", buffering=0) as f,
            ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool,
        ):
            for name, info in sorted(infos.items(), key=lambda item: item[1].start):
                if dtype is not None and info.dtype.is_floating_point and info.dtype != dtype:
                    converted = True
                    yield name, _read_converted(f, info, dtype)
                else:
                    yield name, _read_tensor(f, info, pool)
    except OSError as exc:
        raise ModelFileError(path, "a complete, readable .safetensors file", str(exc)) from exc
    if converted:
        _return_freed_heap()


def _return_freed_heap() -> None:
    """Hand freed heap memory back to the OS after a conversion: glibc keeps some of the freed chunks and
    temporaries, which would count in the process's memory for as long as it runs."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (Windows, macOS, musl): nothing kept that way, or nothing to call


def load_safetensors(
    path: str | Path, dtype: torch.dtype | None = None, names: Collection[str] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of one file (all, or ``names``); a missing, truncated or corrupt file raises ModelFileError."""
    return dict(iter_safetensors(path, dtype, names))


def folder_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a ``save_pretrained`` folder: its index's shards, or its one file.

    Checks that every shard the index names exists and that the shards hold every tensor the index
    lists (headers only), so a half-downloaded folder is refused before anything is read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFileError(folder, "a folder of .safetensors weights", "it does not exist")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if not indexes:
        files = sorted(folder.glob("*.safetensors"))
        if len(files) != 1:
            found = ", ".join(f.name for f in files) or "none"
            raise ModelFileError(
                folder, "one .safetensors file or a *.safetensors.index.json", f"found: {found}"
            )
        return files
    try:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(indexes[0], "a shard index json with a 'weight_map'", str(exc)) from exc
    shards = [folder / name for name in sorted(set(weight_map.values()))]
    held = set()
    for shard in shards:
        if not shard.is_file():
            raise ModelFileError(shard, f"a shard listed in {indexes[0].name}", "it does not exist")
        held.update(read_header(shard))
    absent = sorted(set(weight_map) - held)
    if absent:
        raise ModelFileError(
            folder / weight_map[absent[0]],
            f"tensor {absent[0]!r} (listed in {indexes[0].name})",
            f"{len(absent)} listed tensor(s) are missing",
        )
    return shards


def folder_tensor_infos(folder: str | Path) -> dict[str, TensorInfo]:
    """Every tensor's header entry across a folder's shards (nothing is read but the headers)."""
    infos: dict[str, TensorInfo] = {}
    for path in folder_files(folder):
        infos.update(read_header(path))
    return infos


def load_folder_state_dict(folder: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Merge the shards of a ``save_pretrained`` folder (index json or a single file) into one dict."""
    state_dict: dict[str, torch.Tensor] = {}
    for path in folder_files(folder):
        state_dict.update(iter_safetensors(path, dtype))
    return state_dict


def majority_float_dtype(dtype_counts) -> torch.dtype | None:
    """The floating dtype holding most elements (what a model was saved in).

    ``dtype_counts``: (dtype, element count) pairs, e.g. from headers without reading the tensors.
    """
    counts: dict[torch.dtype, int] = {}
    for dtype, count in dtype_counts:
        if dtype.is_floating_point:
            counts[dtype] = counts.get(dtype, 0) + count
    return max(counts, key=counts.get) if counts else None
