"""Apply a Lumina-2 / Z-Image LoRA of any key layout with ComfyUI's own LoRA machinery.

``models.lora_keys`` names the ComfyUI weight each module of the file patches (split q/k/v become
``(qkv weight, (0, offset, rows))`` slices sized from the model); ``comfy.lora.load_lora`` builds the
adapters from the file's tensors with that key map, and ``ModelPatcher.add_patches`` /
``CLIP.add_patches`` apply them on clones -- so strengths, LoHa/LoKr/DoRA, weight offloading and
unpatching work exactly as with ComfyUI's own LoraLoader. Keys that name nothing are reported
(count and first names), never silently dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..loading.errors import ModelFileError
from ..loading.safetensors_io import load_safetensors, read_header
from .convert import to_comfy_native, validate_lora
from .keys import ParsedLora, parse_lora, qkv_slices

log = logging.getLogger(__name__)
DIFFUSION_PREFIX = "diffusion_model."
SHOWN = 5


@dataclass
class LoraReport:
    """What a load did: layouts recognised, weights patched, keys not applied."""

    file: str
    layouts: list = field(default_factory=list)
    model_patched: int = 0
    qkv_slices: int = 0
    clip_patched: int = 0
    unmapped: list = field(default_factory=list)
    text_encoder_skipped: list = field(default_factory=list)

    def text(self) -> str:
        lines = [
            f"LoRA {Path(self.file).name}",
            f"layout: {', '.join(self.layouts) or 'text encoder only'}",
            f"model: {self.model_patched} patches ({self.qkv_slices} of them on q/k/v rows of a fused qkv)",
            f"clip: {self.clip_patched} patches",
        ]
        if self.text_encoder_skipped:
            lines.append(
                f"text-encoder keys not applied (no CLIP connected): {len(self.text_encoder_skipped)}"
            )
        if self.unmapped:
            first = ", ".join(self.unmapped[:SHOWN])
            lines.append(f"unmapped keys (NOT applied): {len(self.unmapped)}; first: {first}")
        else:
            lines.append("unmapped keys: 0")
        return "\n".join(lines)


def is_nextdit(model_patcher) -> bool:
    import comfy.ldm.lumina.model

    dm = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    return isinstance(dm, comfy.ldm.lumina.model.NextDiT)


def target_shapes(model_patcher) -> dict:
    """ComfyUI NextDiT parameter name (without ``diffusion_model.``) -> shape."""
    return {
        name[len(DIFFUSION_PREFIX) :]: tuple(t.shape)
        for name, t in model_patcher.model.state_dict().items()
        if name.startswith(DIFFUSION_PREFIX)
    }


def model_key_map(parsed: ParsedLora, shapes: dict, absent) -> dict:
    """ComfyUI ``to_load`` map: LoRA module name -> weight key, or (key, (0, offset, rows))."""
    key_map = {}
    skip = {id(m) for m in absent}
    for module in parsed.modules:
        if id(module) in skip:
            continue
        key = DIFFUSION_PREFIX + module.target.key
        if module.target.part is None:
            key_map[module.stem] = key
        else:
            offset, size = qkv_slices(shapes[module.target.key])[module.target.part]
            key_map[module.stem] = (key, (0, offset, size))
    return key_map


def clip_key_map(clip) -> dict:
    """ComfyUI's text-encoder LoRA names plus kohya / diffusers spellings of the HF module names."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    for name in clip.cond_stage_model.state_dict():
        if not name.endswith(".weight") or ".transformer." not in name:
            continue
        module = name[: -len(".weight")].split(".transformer.", 1)[1]  # model.layers.0.self_attn.q_proj
        for rest in {module, module.removeprefix("model.")}:
            for alias in (
                f"lora_te_{rest.replace('.', '_')}",
                f"lora_te1_{rest.replace('.', '_')}",
                f"text_encoder.{rest}",
                f"te.{rest}",
            ):
                key_map.setdefault(alias, name)
    return key_map


def _refuse_bias_on_slices(modules, path):
    for module in modules:
        for suffix in module.tensors:
            if suffix == ".diff_b" and module.target.part is not None:
                raise ModelFileError(
                    path,
                    "no bias deltas on split q/k/v modules",
                    f"{module.stem + suffix!r}: NextDiT's fused qkv has no bias",
                )


def check_lora_header(path, shapes=None) -> None:
    """The file's keys, up/down pairs, ranks and (with ``shapes``) delta shapes, checked from the
    header before any tensor is read: a foreign or oversized LoRA costs no memory to refuse."""
    import torch

    infos = read_header(path)
    meta = {name: torch.empty(info.shape, dtype=info.dtype, device="meta") for name, info in infos.items()}
    validate_lora(meta, parse_lora(meta), path, shapes, check_values=False)


def apply_lora(model, clip, path, strength_model: float = 1.0, strength_clip: float = 1.0):
    """``(model clone, clip clone, LoraReport)`` with the LoRA in ``path`` applied.

    ``model`` must be a Lumina-2 / Z-Image ModelPatcher; ``clip`` may be None. Raises
    ModelFileError (naming the file and the first offending key) for NaN/inf weights, rank
    mismatches, a LoRA of another architecture or size, or one that patches nothing here.
    """
    import comfy.lora

    if not is_nextdit(model):
        raise ValueError(
            "model: expected a Lumina-Image-2.0 / Z-Image (NextDiT) model, got "
            f"{type(getattr(model, 'model', model)).__name__}"
        )
    shapes = target_shapes(model)
    check_lora_header(path, shapes)
    state_dict = load_safetensors(path)
    parsed = parse_lora(state_dict)
    absent = validate_lora(state_dict, parsed, path, shapes)
    _refuse_bias_on_slices(parsed.modules, path)
    report = LoraReport(str(path), layouts=parsed.layouts(), unmapped=list(parsed.unmapped))
    report.unmapped += [m.stem + s for m in absent for s in m.tensors]

    key_map = model_key_map(parsed, shapes, absent)
    clip_map = clip_key_map(clip) if clip is not None else {}
    te_stems = [m.stem for m in parsed.text_encoder]
    if clip is None:
        report.text_encoder_skipped = [m.stem + s for m in parsed.text_encoder for s in m.tensors]
    else:
        missing = [m for m in parsed.text_encoder if m.stem not in clip_map]
        report.unmapped += [m.stem + s for m in missing for s in m.tensors]
        key_map.update({stem: clip_map[stem] for stem in te_stems if stem in clip_map})
    if not key_map and not parsed.modules and clip is None:
        raise ModelFileError(
            path,
            "diffusion-model keys (or a CLIP connected to take its text-encoder keys)",
            f"it only patches the text encoder, e.g. {parsed.text_encoder[0].stem!r}",
        )
    if not key_map:
        first = (parsed.modules or parsed.text_encoder)[0].stem
        raise ModelFileError(
            path,
            "a LoRA for this model",
            f"none of its modules exists in this model (e.g. {first!r}); "
            "it was made for another architecture or size",
        )

    patches = comfy.lora.load_lora(state_dict, key_map, log_missing=False)
    new_model = model.clone()
    added = set(new_model.add_patches(patches, strength_model))
    new_clip = None
    if clip is not None:
        new_clip = clip.clone()
        added |= set(new_clip.add_patches(patches, strength_clip))
    report.unmapped += [stem for stem, target in key_map.items() if target not in added]
    report.model_patched = sum(
        1 for k in added if (k if isinstance(k, str) else k[0]).startswith(DIFFUSION_PREFIX)
    )
    report.qkv_slices = sum(1 for k in added if not isinstance(k, str))
    report.clip_patched = len(added) - report.model_patched
    report.unmapped = sorted(set(report.unmapped))
    if report.unmapped:
        log.warning(
            "LTLoraLoader: %s: %d key(s) not applied, first: %s",
            path,
            len(report.unmapped),
            ", ".join(report.unmapped[:SHOWN]),
        )
    return new_model, new_clip, report


def convert_file(src, dst, shapes=None) -> dict:
    """Write the LoRA in ``src`` to ``dst`` in ComfyUI-native layout (temp file + rename).

    ``shapes``: ComfyUI NextDiT parameter shapes to size and check against (or None). Returns a
    summary dict (layouts, keys in/out, unmapped keys). Refuses to write when keys cannot be mapped,
    so nothing of the file is silently lost.
    """
    import safetensors.torch

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"output: {dst} is the input file; choose another name")
    check_lora_header(src, shapes)
    state_dict = load_safetensors(src)
    parsed = parse_lora(state_dict)
    absent = validate_lora(state_dict, parsed, src, shapes)
    lost = list(parsed.unmapped) + [m.stem + s for m in absent for s in m.tensors]
    if lost:
        raise ModelFileError(
            src,
            "a LoRA whose every key maps to this model",
            f"{len(lost)} key(s) name nothing here, first: {lost[:SHOWN]}",
        )
    native = to_comfy_native(parsed, src, shapes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    metadata = {"lumina_turbo_converted_from": src.name, "lumina_turbo_layouts": "; ".join(parsed.layouts())}
    safetensors.torch.save_file({k: v.contiguous() for k, v in native.items()}, str(tmp), metadata=metadata)
    tmp.replace(dst)
    return {
        "layouts": parsed.layouts(),
        "keys_in": len(state_dict),
        "keys_out": len(native),
        "path": str(dst),
    }


def transformer_file_shapes(path) -> dict:
    """ComfyUI NextDiT parameter shapes of a transformer file (ComfyUI or diffusers names) or a
    diffusers folder, read from the headers only (for the converter's ``--model``)."""
    import torch

    from ..loading.model_files import TRANSFORMER_PREFIXES
    from ..loading.nextdit_keys import diffusers_to_comfy, is_comfy_nextdit

    path = Path(path)
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    files = sorted(folder.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ModelFileError(path, "a transformer .safetensors file or a diffusers folder", "no such file")
    header = {name: info.shape for file in files for name, info in read_header(file).items()}
    for prefix in TRANSFORMER_PREFIXES:
        if any(name.startswith(prefix) for name in header):
            header = {name[len(prefix) :]: shape for name, shape in header.items() if name.startswith(prefix)}
            break
    meta = {name: torch.empty(shape, device="meta") for name, shape in header.items()}
    try:
        if not is_comfy_nextdit(meta):
            meta = diffusers_to_comfy(meta)
    except ValueError as exc:
        raise ModelFileError(path, "a Lumina-Image-2.0 or Z-Image transformer", str(exc)) from exc
    return {name: tuple(t.shape) for name, t in meta.items()}
