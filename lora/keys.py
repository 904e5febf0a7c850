"""LoRA key layouts for Lumina-Image-2.0 / Z-Image (NextDiT) -> ComfyUI module names.

Pure Python (no ComfyUI import), so the converter command line and unit tests use it as is.

A LoRA key is ``<prefix><module><adapter suffix>``. This module splits a key into those parts and
names the ComfyUI NextDiT weight it patches, for every layout in circulation:

============================  =====================================================  ==============================
prefix                        module names                                           written by
============================  =====================================================  ==============================
``diffusion_model.``          ComfyUI native (``layers.3.attention.qkv``)            diffusion-pipe, ComfyUI trainer
``lora_unet_`` (underscores)  native (``lora_unet_layers_3_attention_qkv``)           kohya sd-scripts (Lumina)
``lora_unet_`` (underscores)  Z-Image diffusers (``..._attention_to_q``)              musubi-tuner (raw)
``transformer.`` or none      diffusers Lumina-2 (``attn.to_q``, ``feed_forward.``    diffusers / PEFT, SimpleTuner
                              ``linear_1``, ``norm1.linear``) or Z-Image
                              (``attention.to_q``, ``adaLN_modulation.0``)
``diffusion_model.``          diffusers names                                        ai-toolkit, AC-RF, DiffSynth
``lycoris_``, ``lora_transformer_``  underscored, any of the names above           SimpleTuner LyCORIS, OneTrainer
============================  =====================================================  ==============================

The diffusers <-> ComfyUI name tables are the ones of ``models.nextdit_keys`` (one source of truth).
Split ``to_q``/``to_k``/``to_v`` modules patch row slices of ComfyUI's fused ``attention.qkv``; their
sizes come from the model (grouped-query attention: k and v are narrower than q), see
:func:`qkv_slices`.

Adapter suffixes are the ones ComfyUI's ``comfy.weight_adapter`` and ``comfy.lora.load_lora`` read
(LoRA in its diffusers/PEFT/kohya spellings, LoHa, LoKr, GLoRA, OFT, full ``diff``), so the patches
themselves are built and applied by ComfyUI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..loading import nextdit_keys

# Adapter suffixes ComfyUI understands (comfy/weight_adapter/*.py and comfy/lora.py::load_lora).
LORA_UP_DOWN = (
    (".lora_up.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B", ".lora_A"),
)
OTHER_SUFFIXES = (
    ".lora_mid.weight",
    ".alpha",
    ".dora_scale",
    ".reshape_weight",
    ".hada_w1_a",
    ".hada_w1_b",
    ".hada_w2_a",
    ".hada_w2_b",
    ".hada_t1",
    ".hada_t2",
    ".lokr_w1",
    ".lokr_w2",
    ".lokr_w1_a",
    ".lokr_w1_b",
    ".lokr_w2_a",
    ".lokr_w2_b",
    ".lokr_t2",
    ".a1.weight",
    ".a2.weight",
    ".b1.weight",
    ".b2.weight",
    ".oft_blocks",
    ".rescale",
    ".diff",
    ".diff_b",
    ".set_weight",
    ".w_norm",
    ".b_norm",
)
ADAPTER_SUFFIXES = tuple(
    sorted({s for pair in LORA_UP_DOWN for s in pair} | set(OTHER_SUFFIXES), key=len, reverse=True)
)

# Prefixes in front of the module name: (prefix, underscored names?, label for the report).
DIFFUSION_PREFIXES = (
    ("model.diffusion_model.", False, "diffusion_model."),
    ("diffusion_model.", False, "diffusion_model."),
    ("base_model.model.transformer.", False, "PEFT base_model.model."),
    ("base_model.model.", False, "PEFT base_model.model."),
    ("transformer.", False, "transformer."),
    ("unet.", False, "unet."),
    ("lora_unet_", True, "kohya lora_unet_"),
    ("lycoris_", True, "LyCORIS lycoris_"),
    ("lora_transformer_", True, "OneTrainer lora_transformer_"),
)
# Text-encoder prefixes (applied to a CLIP when one is given, see models.lora_apply).
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoders.", "te.")

NATIVE = "ComfyUI names"
SHARED = "names ComfyUI and diffusers share"  # e.g. Z-Image's feed_forward.w1: says nothing about the layout
NAME_LABELS = {
    nextdit_keys.LUMINA2: "diffusers Lumina-2 names",
    nextdit_keys.ZIMAGE: "diffusers Z-Image names",
}
QKV_PARTS = ("q", "k", "v")


@dataclass(frozen=True)
class Target:
    """The ComfyUI NextDiT parameter a LoRA module patches.

    ``key``: parameter name without ``diffusion_model.`` (``layers.3.attention.qkv.weight``);
    ``part``: ``"q"``, ``"k"`` or ``"v"`` for a row slice of the fused qkv, else None;
    ``names``: which naming the file used (for the report).
    """

    key: str
    part: str | None
    names: str

    @property
    def module(self) -> str:
        return self.key[: -len(".weight")] if self.key.endswith(".weight") else self.key


def _native_names():
    top, block = {"norm_final"}, {nextdit_keys.QKV_MODULE}
    for family in nextdit_keys.FAMILIES:
        family_top, family_block, _ = nextdit_keys.module_renames(family)
        top.update(family_top.values())
        block.update(family_block.values())
    return top, block


def _alias_tables():
    """(top, block) alias tables: module name (dotted) -> (native name, qkv part, names label)."""
    native_top, native_block = _native_names()
    top = {name: (name, None, NATIVE) for name in native_top}
    block = {name: (name, None, NATIVE) for name in native_block}
    for family in nextdit_keys.FAMILIES:
        family_top, family_block, qkv = nextdit_keys.module_renames(family)
        label = NAME_LABELS[family]
        for table, renames in ((top, family_top), (block, family_block)):
            for src, dst in renames.items():
                if src not in table:
                    table[src] = (dst, None, label)
                elif src == dst:
                    table[src] = (dst, None, SHARED)
        for src, part in zip(qkv, QKV_PARTS, strict=True):
            block[src] = (nextdit_keys.QKV_MODULE, part, label)
    return top, block


_TOP, _BLOCK = _alias_tables()
_TOP_UNDERSCORED = {name.replace(".", "_"): value for name, value in _TOP.items()}
_BLOCK_UNDERSCORED = {name.replace(".", "_"): value for name, value in _BLOCK.items()}
_STACKS = "|".join(nextdit_keys.BLOCK_STACKS)
_DOTTED_BLOCK = re.compile(rf"^({_STACKS})\.(\d+)\.(.+)$")
_UNDERSCORED_BLOCK = re.compile(rf"^({_STACKS})_(\d+)_(.+)$")


def split_adapter_key(key: str) -> tuple[str, str] | None:
    """``'x.lora_A.weight'`` -> ``('x', '.lora_A.weight')``; None when no adapter suffix matches."""
    for suffix in ADAPTER_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return None


def is_text_encoder_stem(stem: str) -> bool:
    return stem.startswith(TEXT_ENCODER_PREFIXES)


def resolve_module(stem: str) -> tuple[Target, str] | None:
    """Map a LoRA module name (key without adapter suffix) to its ComfyUI target.

    Returns ``(target, prefix label)`` or None when the name is not a NextDiT module in any layout.
    """
    rest, underscored, prefix_label = stem, False, "no prefix"
    for prefix, is_underscored, label in DIFFUSION_PREFIXES:
        if stem.startswith(prefix):
            rest, underscored, prefix_label = stem[len(prefix) :], is_underscored, label
            break
    top, block, pattern = (
        (_TOP_UNDERSCORED, _BLOCK_UNDERSCORED, _UNDERSCORED_BLOCK)
        if underscored
        else (_TOP, _BLOCK, _DOTTED_BLOCK)
    )
    found = None
    match = pattern.match(rest)
    if match and match.group(3) in block:
        native, part, names = block[match.group(3)]
        found = (f"{match.group(1)}.{match.group(2)}.{native}", part, names)
    elif rest in top:
        found = top[rest]
    if found is None:
        return None
    native, part, names = found
    key = native if native.endswith("pad_token") else native + ".weight"
    return Target(key, part, names), prefix_label


def qkv_slices(qkv_shape) -> dict[str, tuple[int, int]]:
    """Row ``(offset, size)`` of q, k and v inside a fused NextDiT ``attention.qkv`` weight.

    NextDiT's q has ``n_heads * head_dim == dim`` rows (dim = the input width); k and v share the
    rest equally (``n_kv_heads * head_dim`` each, fewer than q under grouped-query attention).
    """
    rows, dim = int(qkv_shape[0]), int(qkv_shape[1])
    kv = (rows - dim) // 2
    if kv <= 0 or dim + 2 * kv != rows:
        raise ValueError(
            f"a fused qkv weight of shape {tuple(qkv_shape)} does not split into q (dim) + 2 equal k/v parts"
        )
    return {"q": (0, dim), "k": (dim, kv), "v": (dim + kv, kv)}


@dataclass
class LoraModule:
    """All tensors of one LoRA module: ``stem`` (as in the file) and ``tensors`` by adapter suffix."""

    stem: str
    tensors: dict
    target: Target | None = None
    prefix_label: str = ""

    def up_down(self):
        """``(up_key_suffix, down_key_suffix)`` of a plain LoRA pair, or None for other adapters."""
        for up, down in LORA_UP_DOWN:
            if up in self.tensors or down in self.tensors:
                return up, down
        return None

    @property
    def is_lora(self) -> bool:
        kinds = {s for pair in LORA_UP_DOWN for s in pair} | {".alpha", ".lora_mid.weight"}
        return self.up_down() is not None and set(self.tensors) <= kinds


@dataclass
class ParsedLora:
    """A LoRA state dict grouped per module: NextDiT modules, text-encoder modules, the rest."""

    modules: list  # LoraModule with a target
    text_encoder: list  # LoraModule (stems with a text-encoder prefix)
    unmapped: list  # keys that name nothing this loader knows

    def layouts(self) -> list[str]:
        """'<prefix> + <names>' of the modules; shared names count only when nothing else tells."""
        labels = {(m.prefix_label, m.target.names) for m in self.modules}
        telling = {prefix for prefix, names in labels if names != SHARED}
        return sorted(
            f"{prefix} + {NATIVE if names == SHARED else names}"
            for prefix, names in labels
            if names != SHARED or prefix not in telling
        )


def parse_lora(state_dict) -> ParsedLora:
    """Group ``state_dict`` keys by module and resolve every module name (no tensor is copied)."""
    groups: dict[str, dict] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        split = split_adapter_key(key)
        if split is None:
            unmapped.append(key)
            continue
        stem, suffix = split
        groups.setdefault(stem, {})[suffix] = tensor
    modules, text_encoder = [], []
    for stem, tensors in groups.items():
        if is_text_encoder_stem(stem):
            text_encoder.append(LoraModule(stem, tensors))
            continue
        resolved = resolve_module(stem)
        if resolved is None:
            unmapped.extend(stem + suffix for suffix in tensors)
            continue
        target, prefix_label = resolved
        modules.append(LoraModule(stem, tensors, target, prefix_label))
    return ParsedLora(modules, text_encoder, sorted(unmapped))
