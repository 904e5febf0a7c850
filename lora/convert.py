"""Checks of a parsed NextDiT LoRA and its conversion to ComfyUI-native layout (pure torch).

``validate_lora`` refuses broken files with a message naming the file and the first offending key
(non-finite weights, an up/down rank mismatch, a missing half of a pair, a module whose shape does
not fit the model). ``to_comfy_native`` writes any supported layout as
``diffusion_model.<ComfyUI module>.lora_up.weight / .lora_down.weight / .alpha``; split q/k/v LoRAs
are fused into one LoRA on the fused ``attention.qkv``:

    down = cat(down_q, down_k, down_v)    shape (r_q + r_k + r_v, dim)
    up   = blockdiag(s_q up_q, s_k up_k, s_v up_v) placed at the q/k/v row offsets
    alpha = r_q + r_k + r_v               (scale 1; each part's alpha/rank is folded into its up)

so ``up @ down`` equals the three deltas stacked, and ComfyUI's stock LoraLoader loads the result
without a warning. A missing alpha means scale 1 (PEFT / diffusers files), as in ComfyUI.
"""

from __future__ import annotations

import torch

from ..loading.errors import ModelFileError
from .keys import QKV_PARTS, ParsedLora, qkv_slices

NATIVE_PREFIX = "diffusion_model."


def check_finite(state_dict, path):
    """Raise ModelFileError naming the first tensor with NaN or infinity."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(path, "finite LoRA weights", f"tensor {key!r} holds NaN or infinity")


def _pair(module, path):
    """(up, down) tensors of a plain LoRA module, checked for presence and matching rank."""
    up_suffix, down_suffix = module.up_down()
    up, down = module.tensors.get(up_suffix), module.tensors.get(down_suffix)
    if up is None or down is None:
        have, missing = (up_suffix, down_suffix) if up is not None else (down_suffix, up_suffix)
        raise ModelFileError(
            path,
            "an up and a down weight for every LoRA module",
            f"{module.stem + have!r} has no {module.stem + missing!r}",
        )
    if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0]:
        raise ModelFileError(
            path,
            "LoRA up/down weights of the same rank",
            f"{module.stem + up_suffix!r} {tuple(up.shape)} and {module.stem + down_suffix!r} "
            f"{tuple(down.shape)} disagree (up is (out, rank), down is (rank, in))",
        )
    return up, down


def _check_rank(module, pair, path):
    # a rank above both sides of the delta adds nothing, only bytes (a header may declare gigabytes)
    up, down = pair
    rank, rows, width = up.shape[1], up.shape[0], int(torch.Size(down.shape[1:]).numel())
    if rank > max(rows, width):
        raise ModelFileError(
            path,
            "a LoRA rank no larger than the weight it patches",
            f"{module.stem!r} has rank {rank} for a delta of {rows} x {width}",
        )


def expected_shape(target, target_shapes):
    """(rows, in_features) a delta for ``target`` must have, from the model's weight shapes."""
    shape = tuple(target_shapes[target.key])
    if target.part is None:
        return shape
    offset, size = qkv_slices(shape)[target.part]
    return (size, *shape[1:])


def validate_lora(state_dict, parsed: ParsedLora, path, target_shapes=None, check_values=True):
    """Refuse a broken or foreign LoRA; returns the modules the model does not have (for the report).

    Args:
        state_dict: the file's tensors; parsed: ``lora_keys.parse_lora(state_dict)``.
        path: the file, named in every error.
        target_shapes: ComfyUI NextDiT parameter name (no ``diffusion_model.``) -> shape, or None to
            check only the file's own consistency (the converter without a model).
        check_values: False for meta tensors built from the header (keys and shapes only).
    """
    if check_values:
        check_finite(state_dict, path)
    if not parsed.modules and not parsed.text_encoder:
        first = next(iter(state_dict), None)
        raise ModelFileError(
            path,
            "a Lumina-Image-2.0 / Z-Image (NextDiT) LoRA",
            f"none of its {len(state_dict)} keys names a NextDiT module; first: {first!r}",
        )
    absent = []
    for module in parsed.modules:
        pair = _pair(module, path) if module.up_down() is not None else None
        if pair is not None:
            _check_rank(module, pair, path)
        if target_shapes is None:
            continue
        if module.target.key not in target_shapes:
            absent.append(module)
            continue
        want = expected_shape(module.target, target_shapes)
        where = module.target.module + (f" rows of {module.target.part}" if module.target.part else "")
        if pair is not None:
            up, down = pair
            got = (up.shape[0], *down.shape[1:])
            key = module.stem + module.up_down()[0]
        elif ".diff" in module.tensors:
            got, key = tuple(module.tensors[".diff"].shape), module.stem + ".diff"
        else:
            continue  # LoHa / LoKr / OFT: ComfyUI checks those itself
        if tuple(got) != tuple(want):
            raise ModelFileError(
                path,
                "a LoRA made for this model (same architecture and size)",
                f"{key!r} gives a delta of shape {tuple(got)} but the model's {where} is {tuple(want)}",
            )
    return absent


def _scaled_pair(module, path):
    up, down = _pair(module, path)
    if ".lora_mid.weight" in module.tensors or ".dora_scale" in module.tensors:
        raise ModelFileError(
            path,
            "plain LoRA weights on split q/k/v modules",
            f"{module.stem!r} has a mid or DoRA weight, which cannot be fused into qkv",
        )
    alpha = module.tensors.get(".alpha")
    scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
    return up.float() * scale, down.float(), up.dtype


def _fuse_qkv(parts, path, qkv_shape, kv_rows_hint):
    """One native LoRA (or diff) for a fused qkv from its split q/k/v modules."""
    any_module = next(iter(parts.values()))
    kinds = {
        "lora" if m.is_lora else ("diff" if set(m.tensors) == {".diff"} else "other") for m in parts.values()
    }
    if len(kinds) != 1 or "other" in kinds:
        raise ModelFileError(
            path,
            "LoRA or diff weights on split q/k/v modules (to fuse them into qkv)",
            f"{any_module.stem!r}: LoHa/LoKr/mixed adapters on q/k/v cannot be written in "
            "ComfyUI-native layout; load the file with LTLoraLoader instead",
        )
    if qkv_shape is not None:
        slices = qkv_slices(qkv_shape)
    else:

        def rows(m):
            return m.tensors[".diff"].shape[0] if ".diff" in m.tensors else _pair(m, path)[0].shape[0]

        def width(m):
            return m.tensors[".diff"].shape[1] if ".diff" in m.tensors else _pair(m, path)[1].shape[1]

        dim = rows(parts["q"]) if "q" in parts else width(any_module)
        kv = rows(parts["k"]) if "k" in parts else rows(parts["v"]) if "v" in parts else kv_rows_hint
        if kv is None:
            raise ModelFileError(
                path,
                "to_k or to_v somewhere in the file, or a model to size k/v from",
                f"{any_module.stem!r}: only q is patched and the k/v width is unknown",
            )
        slices = {"q": (0, dim), "k": (dim, kv), "v": (dim + kv, kv)}
    total = sum(size for _, size in slices.values())
    if kinds == {"diff"}:
        diff = next(iter(parts.values())).tensors[".diff"]
        fused = torch.zeros(total, *diff.shape[1:], dtype=diff.dtype)
        for part, module in parts.items():
            offset, size = slices[part]
            fused[offset : offset + size] = module.tensors[".diff"]
        return {".diff": fused}
    scaled = {part: _scaled_pair(module, path) for part, module in parts.items()}
    rank = sum(down.shape[0] for _, down, _ in scaled.values())
    dtype = next(iter(scaled.values()))[2]
    in_features = next(iter(scaled.values()))[1].shape[1]
    up = torch.zeros(total, rank)
    down = torch.zeros(rank, in_features)
    col = 0
    for part in QKV_PARTS:
        if part not in scaled:
            continue
        part_up, part_down, _ = scaled[part]
        offset, size = slices[part]
        r = part_down.shape[0]
        up[offset : offset + size, col : col + r] = part_up
        down[col : col + r] = part_down
        col += r
    return {
        ".lora_up.weight": up.to(dtype),
        ".lora_down.weight": down.to(dtype),
        ".alpha": torch.tensor(float(rank)),
    }


def _native_lora(module, path):
    if not module.is_lora:
        return dict(module.tensors)  # other adapters keep their suffixes; only the name changes
    up, down = _pair(module, path)
    out = {".lora_up.weight": up, ".lora_down.weight": down}
    alpha = module.tensors.get(".alpha")
    out[".alpha"] = torch.tensor(float(alpha) if alpha is not None else float(down.shape[0]))
    if ".lora_mid.weight" in module.tensors:
        out[".lora_mid.weight"] = module.tensors[".lora_mid.weight"]
    return out


def to_comfy_native(parsed: ParsedLora, path, target_shapes=None):
    """The LoRA in ComfyUI-native layout (``diffusion_model.<module><suffix>``), as a new dict.

    Text-encoder keys are copied unchanged. ``target_shapes`` (as in :func:`validate_lora`) sizes the
    q/k/v slices; without it they are read from the file (k/v width from any block that patches k/v).
    """
    out = {}
    owners = {}
    qkv_groups = {}
    for module in parsed.modules:
        target = module.target
        if target.part is not None:
            group = qkv_groups.setdefault(target.key, {})
            if target.part in group:
                raise ModelFileError(
                    path,
                    "one LoRA module per weight",
                    f"{group[target.part].stem!r} and {module.stem!r} both patch {target.part} of {target.module}",
                )
            group[target.part] = module
            continue
        if target.key in owners:
            raise ModelFileError(
                path,
                "one LoRA module per weight",
                f"{owners[target.key]!r} and {module.stem!r} both patch {target.module}",
            )
        owners[target.key] = module.stem
        for suffix, tensor in _native_lora(module, path).items():
            out[NATIVE_PREFIX + target.module + suffix] = tensor
    kv_hint = next(
        (
            m.tensors[m.up_down()[0]].shape[0]
            for g in qkv_groups.values()
            for p, m in g.items()
            if p in ("k", "v") and m.is_lora and m.up_down()[0] in m.tensors
        ),
        None,
    )
    for key, parts in qkv_groups.items():
        if key in owners:
            raise ModelFileError(
                path,
                "one LoRA module per weight",
                f"{owners[key]!r} patches the fused qkv that split q/k/v modules also patch",
            )
        module_name = key[: -len(".weight")]
        shape = target_shapes.get(key) if target_shapes else None
        for suffix, tensor in _fuse_qkv(parts, path, shape, kv_hint).items():
            out[NATIVE_PREFIX + module_name + suffix] = tensor
    for module in parsed.text_encoder:
        for suffix, tensor in module.tensors.items():
            out[module.stem + suffix] = tensor
    return out
