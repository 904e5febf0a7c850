"""Rename diffusers Lumina-Image-2.0 / Z-Image transformer weights to ComfyUI's NextDiT names.

Pure Python + torch (no ComfyUI import), so it also runs in converters and tests.

Families
--------
``"lumina2"``  diffusers ``Lumina2Transformer2DModel`` (``attn.to_q``, ``feed_forward.linear_1``,
               ``norm1.linear``, ``time_caption_embed.*``, ``norm_out.*``). Inverse of diffusers'
               ``single_file_utils.convert_lumina2_to_diffusers``, but sized from the tensors, not
               from the hard-coded 2304/768/768 split.
``"zimage"``   diffusers ``ZImageTransformer2DModel`` (``attention.to_q``, ``all_x_embedder.2-1``,
               ``all_final_layer.2-1``). Inverse of ComfyUI's ``comfy.utils.z_image_to_diffusers``.

q/k/v are concatenated along dim 0 into ComfyUI's fused ``attention.qkv`` in the order NextDiT
splits it (q rows, then k rows, then v rows). Each part keeps its own row count, so grouped-query
attention (k/v narrower than q) comes out right at any size.

``norm_final.weight`` exists in ComfyUI's NextDiT (and in the original checkpoints) but is never used
by its forward pass; diffusers and released ComfyUI Z-Image files drop it. :func:`add_norm_final`
adds it as ones so ComfyUI can load the result strictly.

Time and sign conventions (checked against the diffusers pipelines and ComfyUI's NextDiT)
---------------------------------------------------------------------------------------
ComfyUI sigma: 1 = pure noise. ComfyUI's ``NextDiT.forward(x, timesteps=sigma, ...)`` computes
``t = 1 - sigma`` itself and returns ``-x``. So for both families, with ``model`` the diffusers
transformer::

    comfy_diffusion_model(x, sigma, context, num_tokens) == -model(x, t=1 - sigma, ...)

- Lumina-2: ``Lumina2Pipeline`` calls ``transformer(timestep=1 - t_diffusers / 1000)`` (= 1 - sigma)
  and negates the output before ``FlowMatchEulerDiscreteScheduler.step``.
- Z-Image: ``ZImagePipeline`` calls ``transformer(x_list, (1000 - t_diffusers) / 1000, cap_list)``
  (= 1 - sigma; the model multiplies by ``t_scale`` = 1000 itself, like ComfyUI's ``time_scale``)
  and negates the stacked output.

Both negated outputs are the flow velocity ``noise - x0`` that ComfyUI's CONST model sampling expects,
so ``BaseModel.apply_model(x, sigma, ...)`` returns ``x - sigma * velocity``.
"""

import torch

LUMINA2 = "lumina2"
ZIMAGE = "zimage"
FAMILIES = (LUMINA2, ZIMAGE)

# Whole-key renames outside the transformer blocks.
_LUMINA2_TOP = {
    "x_embedder.weight": "x_embedder.weight",
    "x_embedder.bias": "x_embedder.bias",
    "time_caption_embed.timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
    "time_caption_embed.timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
    "time_caption_embed.timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
    "time_caption_embed.timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
    "time_caption_embed.caption_embedder.0.weight": "cap_embedder.0.weight",
    "time_caption_embed.caption_embedder.1.weight": "cap_embedder.1.weight",
    "time_caption_embed.caption_embedder.1.bias": "cap_embedder.1.bias",
    "norm_out.linear_1.weight": "final_layer.adaLN_modulation.1.weight",
    "norm_out.linear_1.bias": "final_layer.adaLN_modulation.1.bias",
    "norm_out.linear_2.weight": "final_layer.linear.weight",
    "norm_out.linear_2.bias": "final_layer.linear.bias",
}

# Renames of the part after "<stack>.<i>." inside a block.
_LUMINA2_BLOCK = {
    "attn.to_out.0.weight": "attention.out.weight",
    "attn.norm_q.weight": "attention.q_norm.weight",
    "attn.norm_k.weight": "attention.k_norm.weight",
    "feed_forward.linear_1.weight": "feed_forward.w1.weight",
    "feed_forward.linear_2.weight": "feed_forward.w2.weight",
    "feed_forward.linear_3.weight": "feed_forward.w3.weight",
    "norm1.linear.weight": "adaLN_modulation.1.weight",  # modulated blocks: SiLU is index 0
    "norm1.linear.bias": "adaLN_modulation.1.bias",
    "norm1.norm.weight": "attention_norm1.weight",  # modulated blocks
    "norm1.weight": "attention_norm1.weight",  # context refiner (no modulation)
    "norm2.weight": "attention_norm2.weight",
    "ffn_norm1.weight": "ffn_norm1.weight",
    "ffn_norm2.weight": "ffn_norm2.weight",
}
_LUMINA2_QKV = ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight")

_ZIMAGE_TOP = {
    "all_x_embedder.2-1.weight": "x_embedder.weight",
    "all_x_embedder.2-1.bias": "x_embedder.bias",
    "all_final_layer.2-1.linear.weight": "final_layer.linear.weight",
    "all_final_layer.2-1.linear.bias": "final_layer.linear.bias",
    "all_final_layer.2-1.adaLN_modulation.1.weight": "final_layer.adaLN_modulation.1.weight",
    "all_final_layer.2-1.adaLN_modulation.1.bias": "final_layer.adaLN_modulation.1.bias",
    "t_embedder.mlp.0.weight": "t_embedder.mlp.0.weight",
    "t_embedder.mlp.0.bias": "t_embedder.mlp.0.bias",
    "t_embedder.mlp.2.weight": "t_embedder.mlp.2.weight",
    "t_embedder.mlp.2.bias": "t_embedder.mlp.2.bias",
    "cap_embedder.0.weight": "cap_embedder.0.weight",
    "cap_embedder.1.weight": "cap_embedder.1.weight",
    "cap_embedder.1.bias": "cap_embedder.1.bias",
    "x_pad_token": "x_pad_token",
    "cap_pad_token": "cap_pad_token",
}
_ZIMAGE_BLOCK = {
    "attention.to_out.0.weight": "attention.out.weight",
    "attention.norm_q.weight": "attention.q_norm.weight",
    "attention.norm_k.weight": "attention.k_norm.weight",
    "feed_forward.w1.weight": "feed_forward.w1.weight",
    "feed_forward.w2.weight": "feed_forward.w2.weight",
    "feed_forward.w3.weight": "feed_forward.w3.weight",
    "adaLN_modulation.0.weight": "adaLN_modulation.0.weight",
    "adaLN_modulation.0.bias": "adaLN_modulation.0.bias",
    "attention_norm1.weight": "attention_norm1.weight",
    "attention_norm2.weight": "attention_norm2.weight",
    "ffn_norm1.weight": "ffn_norm1.weight",
    "ffn_norm2.weight": "ffn_norm2.weight",
}
_ZIMAGE_QKV = ("attention.to_q.weight", "attention.to_k.weight", "attention.to_v.weight")

_TABLES = {
    LUMINA2: (_LUMINA2_TOP, _LUMINA2_BLOCK, _LUMINA2_QKV),
    ZIMAGE: (_ZIMAGE_TOP, _ZIMAGE_BLOCK, _ZIMAGE_QKV),
}
_BLOCK_STACKS = ("layers", "noise_refiner", "context_refiner")
_QKV_COMFY = "attention.qkv.weight"


BLOCK_STACKS = _BLOCK_STACKS
QKV_MODULE = "attention.qkv"  # ComfyUI's fused q/k/v Linear inside every block


def module_renames(family):
    """The key tables above at module level (for LoRA key mapping in ``models.lora_keys``).

    Returns ``(top, block, qkv)``: ``top`` maps diffusers module names outside the blocks to
    ComfyUI's, ``block`` does the same for names after ``<stack>.<i>.``, and ``qkv`` is the diffusers
    (q, k, v) module triple that ComfyUI fuses, in that row order, into ``attention.qkv``. Parameters
    that are not a module's weight (the pad tokens) keep their full name.
    """
    if family not in _TABLES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")

    def modules(table):
        out = {}
        for src, dst in table.items():
            if src.endswith(".weight"):
                out[src[: -len(".weight")]] = dst[: -len(".weight")]
            elif not src.endswith(".bias"):
                out[src] = dst
        return out

    top, block, qkv = _TABLES[family]
    return modules(top), modules(block), tuple(name[: -len(".weight")] for name in qkv)


def detect_diffusers_family(state_dict):
    """Return ``"lumina2"`` or ``"zimage"`` for a diffusers transformer state dict, else raise ValueError."""
    if "time_caption_embed.caption_embedder.1.weight" in state_dict:
        return LUMINA2
    if "all_x_embedder.2-1.weight" in state_dict:
        return ZIMAGE
    if any(k.startswith("all_x_embedder.") for k in state_dict):
        raise ValueError(
            "state_dict: this Z-Image transformer has no 2x2 patch embedder ('all_x_embedder.2-1'); "
            "ComfyUI's NextDiT supports only patch size 2 with frame patch 1."
        )
    raise ValueError(
        "state_dict: not a diffusers Lumina-Image-2.0 or Z-Image transformer (expected "
        "'time_caption_embed.caption_embedder.1.weight' or 'all_x_embedder.2-1.weight'); "
        f"first keys: {sorted(state_dict)[:5]}"
    )


def is_comfy_nextdit(state_dict):
    """True when the keys already use ComfyUI's NextDiT names (no prefix)."""
    return "cap_embedder.1.weight" in state_dict and any(k.endswith(_QKV_COMFY) for k in state_dict)


def detect_comfy_family(state_dict):
    """``"zimage"`` or ``"lumina2"`` for ComfyUI NextDiT keys: Z-Image's blocks modulate through
    ``adaLN_modulation.0`` (no SiLU module in front), Lumina-2's through ``adaLN_modulation.1``."""
    return ZIMAGE if "layers.0.adaLN_modulation.0.weight" in state_dict else LUMINA2


def _split_block_key(key):
    """'layers.3.attn.to_q.weight' -> ('layers.3.', 'attn.to_q.weight'); None outside the block stacks."""
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] in _BLOCK_STACKS and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}.", parts[2]
    return None


def diffusers_to_comfy(state_dict, family=None, add_unused_norm_final=True, consume=False):
    """Convert a diffusers Lumina-2 / Z-Image transformer state dict to ComfyUI NextDiT keys.

    Args:
        state_dict: mapping of diffusers key -> tensor. Tensors are shared with the result, only
            the fused qkv are new tensors.
        family: ``"lumina2"``, ``"zimage"`` or None to detect it from the keys.
        add_unused_norm_final: add ComfyUI's unused ``norm_final.weight`` (ones) for strict loading.
        consume: remove each entry from ``state_dict`` as it is converted (it ends empty), so that a
            loader holding no other reference never has the fused qkv and all of q/k/v at once.
            Otherwise ``state_dict`` is not modified.

    Returns:
        dict of ComfyUI key -> tensor. Every input key is used exactly once; an unknown key, or a
        block without all of to_q/to_k/to_v, raises ValueError naming it.
    """
    if family is None:
        family = detect_diffusers_family(state_dict)
    if family not in _TABLES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    top, block, qkv_names = _TABLES[family]

    unknown = []
    for key in state_dict:
        split = _split_block_key(key)
        if key not in top and (split is None or (split[1] not in qkv_names and split[1] not in block)):
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"state_dict: {len(unknown)} key(s) are not part of a diffusers {family} transformer "
            f"that ComfyUI's NextDiT can hold, e.g. {sorted(unknown)[:5]}"
        )

    out = {}
    qkv_parts = {}  # block prefix -> {diffusers qkv name: tensor}, until all three are there
    for key in list(state_dict):
        tensor = state_dict.pop(key) if consume else state_dict[key]
        if key in top:
            out[top[key]] = tensor
            continue
        prefix, rest = _split_block_key(key)
        if rest not in qkv_names:
            out[prefix + block[rest]] = tensor
            continue
        parts = qkv_parts.setdefault(prefix, {})
        parts[rest] = tensor
        if len(parts) == len(qkv_names):
            out[prefix + _QKV_COMFY] = _fuse_qkv(prefix, *(parts[name] for name in qkv_names))
            del qkv_parts[prefix]
    for prefix, parts in qkv_parts.items():
        missing = next(name for name in qkv_names if name not in parts)
        raise ValueError(f"state_dict: {prefix}{missing} is missing (needed to build {prefix}{_QKV_COMFY})")

    if add_unused_norm_final:
        add_norm_final(out)
    return out


def add_norm_final(state_dict):
    """Add ComfyUI's unused ``norm_final.weight`` (ones, an RMSNorm's identity) to a ComfyUI-named
    state dict that lacks it, in place, so ComfyUI can hold it strictly.

    Diffusers drops the key and released ComfyUI Z-Image files lack it too; ComfyUI's own loader
    leaves the parameter unset (``unet missing: ['norm_final.weight']``), which is harmless only
    because its forward never reads it.
    """
    if "norm_final.weight" in state_dict:
        return state_dict
    ref = state_dict.get("cap_embedder.1.weight")
    if ref is None:
        raise ValueError("state_dict: the caption embedder weight is missing (cannot size norm_final)")
    state_dict["norm_final.weight"] = torch.ones(ref.shape[0], dtype=ref.dtype, device=ref.device)
    return state_dict


def _fuse_qkv(prefix, q, k, v):
    if not (q.shape[1:] == k.shape[1:] == v.shape[1:]) or k.shape != v.shape:
        raise ValueError(
            f"state_dict: {prefix}q/k/v shapes do not fit one attention: "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (expected k == v and equal input width)"
        )
    return torch.cat((q, k, v), dim=0)
