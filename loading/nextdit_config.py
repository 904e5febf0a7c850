"""The ComfyUI ``unet_config`` of a NextDiT (Lumina-Image-2.0 / Z-Image) at any size.

Two sources, one result, so that a folder's ``config.json`` and a bare single file agree:

- :func:`unet_config_from_diffusers_config` reads a diffusers ``transformer/config.json`` dict;
- :func:`unet_config_from_state_dict` reads the tensor shapes of a ComfyUI-named state dict.

:func:`validate_unet_config` checks a config against the tensors by building ComfyUI's own
``NextDiT`` on the meta device and comparing every parameter shape.

What the tensor shapes determine: dim and cap_feat_dim (``cap_embedder.1``), in_channels
(``x_embedder``, given the patch size), n_layers / n_refiner_layers (block counts), head_dim
(``q_norm``), hence n_heads, and n_kv_heads (rows of ``qkv``), the FFN width (``w1``), the
modulation style (``adaLN_modulation.0`` = Z-Image, ``.1`` = Lumina-2), pad tokens.

What they do not determine (filled from :data:`FAMILY_DEFAULTS`, or ``overrides``):
patch_size (2), rope_theta, time_scale, norm_eps, axes_lens (ComfyUI's NextDiT never reads them
in its forward: it computes RoPE on the fly) and how head_dim splits into axes_dims
(Lumina-2: three equal parts; Z-Image: 1/4, 3/8, 3/8 -- the published models' splits).

The FFN width W is stored as the (ffn_dim_multiplier, multiple_of) pair that ComfyUI's
``FeedForward`` rounds back to exactly W (it computes ``int(mult * dim)`` rounded up to a multiple
of ``multiple_of``); diffusers' own formulas (Lumina-2: ``4*dim*mult`` rounded, Z-Image:
``int(dim / 3 * 8)`` unrounded) are only used to compute W from a config.json.
"""

import re

from .nextdit_keys import LUMINA2, ZIMAGE, detect_comfy_family

FAMILY_DEFAULTS = {
    LUMINA2: {
        "patch_size": 2,
        "rope_theta": 10000.0,
        "time_scale": 1.0,
        "norm_eps": 1e-5,
        "axes_lens": [300, 512, 512],
    },
    ZIMAGE: {
        "patch_size": 2,
        "rope_theta": 256.0,
        "time_scale": 1000.0,
        "norm_eps": 1e-5,
        "axes_lens": [1536, 512, 512],
    },
}
NOT_IN_TENSORS = ("patch_size", "rope_theta", "time_scale", "norm_eps", "axes_lens", "axes_dims")
_FFN_MULTIPLIER = {LUMINA2: 4.0, ZIMAGE: 8.0 / 3.0}
_MULTIPLE_OF_CANDIDATES = (256, 128, 64, 32, 16, 8, 4, 2, 1)
Z_IMAGE_PAD_MULTIPLE = 32  # diffusers' SEQ_MULTI_OF; ComfyUI's detection uses the same value
Z_IMAGE_MIN_DIM = 1024  # below this diffusers and ComfyUI size Z-Image's timestep embedder differently


def comfy_ffn_width(dim, ffn_dim_multiplier, multiple_of):
    """The hidden width ComfyUI's NextDiT ``FeedForward`` builds for these settings."""
    hidden = int(ffn_dim_multiplier * dim)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_settings(dim, width, family):
    """(ffn_dim_multiplier, multiple_of) that make ComfyUI build an FFN of exactly ``width``.

    Prefers the family's published multiplier (4 or 8/3) with the largest multiple_of that works;
    otherwise ``(width / dim, width)``, which rounds back to ``width`` whatever the float error.
    """
    preferred = _FFN_MULTIPLIER[family]
    for multiple_of in _MULTIPLE_OF_CANDIDATES:
        if comfy_ffn_width(dim, preferred, multiple_of) == width:
            return preferred, multiple_of
    return width / dim, width


def _axes_dims(head_dim, family):
    if family == LUMINA2 and head_dim % 6 == 0:
        return [head_dim // 3] * 3
    if family == ZIMAGE and head_dim % 16 == 0:
        return [head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8]
    raise ValueError(
        f"axes_dims: cannot be inferred for head_dim {head_dim} of a {family} model; "
        "pass overrides={'axes_dims': [...]} (even numbers summing to head_dim)"
    )


def _assemble(
    family,
    *,
    in_channels,
    dim,
    n_layers,
    n_refiner_layers,
    n_heads,
    n_kv_heads,
    ffn_width,
    qk_norm,
    cap_feat_dim,
    pad_tokens,
    values,
):
    """Build the unet_config dict in one fixed key order; ``values`` holds the NOT_IN_TENSORS keys."""
    multiplier, multiple_of = ffn_settings(dim, ffn_width, family)
    return {
        "image_model": "lumina2",
        "patch_size": int(values["patch_size"]),
        "in_channels": int(in_channels),
        "dim": int(dim),
        "n_layers": int(n_layers),
        "n_refiner_layers": int(n_refiner_layers),
        "n_heads": int(n_heads),
        "n_kv_heads": int(n_kv_heads),
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": float(values["norm_eps"]),
        "qk_norm": bool(qk_norm),
        "cap_feat_dim": int(cap_feat_dim),
        "axes_dims": [int(a) for a in values["axes_dims"]],
        "axes_lens": [int(a) for a in values["axes_lens"]],
        "rope_theta": float(values["rope_theta"]),
        "z_image_modulation": family == ZIMAGE,
        "time_scale": float(values["time_scale"]),
        "pad_tokens_multiple": Z_IMAGE_PAD_MULTIPLE if pad_tokens else None,
    }


def family_of_unet_config(unet_config):
    return ZIMAGE if unet_config.get("z_image_modulation") else LUMINA2


# ---------------------------------------------------------------- from a diffusers config.json


def detect_config_family(config):
    name = config.get("_class_name", "")
    if name == "Lumina2Transformer2DModel" or (
        not name and "hidden_size" in config and "num_layers" in config
    ):
        return LUMINA2
    if name == "ZImageTransformer2DModel" or (not name and "dim" in config and "n_layers" in config):
        return ZIMAGE
    raise ValueError(
        f"config: expected a diffusers Lumina2Transformer2DModel or ZImageTransformer2DModel config.json, "
        f"got _class_name={name!r} with keys {sorted(config)[:8]}"
    )


def _require(config, key, family):
    if key not in config:
        raise ValueError(f"config: '{key}' is missing from the {family} transformer config.json")
    return config[key]


def unet_config_from_diffusers_config(config):
    """ComfyUI unet_config from a diffusers transformer ``config.json`` dict (either family)."""
    family = detect_config_family(config)
    if family == LUMINA2:
        return _from_lumina2_config(config)
    return _from_zimage_config(config)


def _from_lumina2_config(config):
    get = config.get
    dim = _require(config, "hidden_size", LUMINA2)
    in_channels = get("in_channels", 16)
    if get("out_channels") not in (None, in_channels):
        raise ValueError(
            f"config: out_channels {get('out_channels')} != in_channels {in_channels}; NextDiT needs them equal"
        )
    n_heads = get("num_attention_heads", 24)
    # diffusers' LuminaFeedForward: 4*dim, times ffn_dim_multiplier, rounded up to multiple_of
    inner = 4 * dim
    if get("ffn_dim_multiplier") is not None:
        inner = int(get("ffn_dim_multiplier") * inner)
    multiple_of = get("multiple_of", 256)
    ffn_width = multiple_of * ((inner + multiple_of - 1) // multiple_of)
    values = dict(FAMILY_DEFAULTS[LUMINA2])
    values.update(
        patch_size=get("patch_size", 2),
        norm_eps=get("norm_eps", 1e-5),
        axes_dims=list(get("axes_dim_rope", (32, 32, 32))),
        axes_lens=list(get("axes_lens", (300, 512, 512))),
    )  # rope_theta is fixed at 10000 inside diffusers' Lumina2 model; time_scale is 1 (t in [0, 1])
    return _assemble(
        LUMINA2,
        in_channels=in_channels,
        dim=dim,
        n_layers=_require(config, "num_layers", LUMINA2),
        n_refiner_layers=get("num_refiner_layers", 2),
        n_heads=n_heads,
        n_kv_heads=get("num_kv_heads") or n_heads,
        ffn_width=ffn_width,
        qk_norm=True,  # diffusers' Lumina2 blocks always normalise q and k
        cap_feat_dim=get("cap_feat_dim", 1024),
        pad_tokens=False,
        values=values,
    )


def _from_zimage_config(config):
    get = config.get
    dim = _require(config, "dim", ZIMAGE)
    if list(get("all_patch_size", (2,))) != [2] or list(get("all_f_patch_size", (1,))) != [1]:
        raise ValueError(
            f"config: all_patch_size={get('all_patch_size')}, all_f_patch_size={get('all_f_patch_size')}; "
            "ComfyUI's NextDiT supports only patch 2 with frame patch 1"
        )
    if get("siglip_feat_dim") is not None:
        raise ValueError(
            "config: siglip_feat_dim is set (Z-Image Omni); ComfyUI 0.3.75's NextDiT has no SigLIP branch"
        )
    if dim < Z_IMAGE_MIN_DIM:
        raise ValueError(
            f"config: dim {dim} < {Z_IMAGE_MIN_DIM}; diffusers builds Z-Image's timestep embedder as 256->1024->"
            f"min(dim, 256) but ComfyUI's NextDiT as 256->min(dim, 1024)->256, so this size cannot load in ComfyUI"
        )
    n_heads = get("n_heads", 30)
    values = dict(FAMILY_DEFAULTS[ZIMAGE])
    values.update(
        norm_eps=get("norm_eps", 1e-5),
        rope_theta=get("rope_theta", 256.0),
        time_scale=get("t_scale", 1000.0),
        axes_dims=list(get("axes_dims", (32, 48, 48))),
        axes_lens=list(get("axes_lens", (1024, 512, 512))),
    )
    return _assemble(
        ZIMAGE,
        in_channels=get("in_channels", 16),
        dim=dim,
        n_layers=_require(config, "n_layers", ZIMAGE),
        n_refiner_layers=get("n_refiner_layers", 2),
        n_heads=n_heads,
        # diffusers' Z-Image attention ignores n_kv_heads: its to_k / to_v are always dim wide
        n_kv_heads=n_heads,
        ffn_width=int(dim / 3 * 8),
        qk_norm=get("qk_norm", True),
        cap_feat_dim=get("cap_feat_dim", 2560),
        pad_tokens=True,
        values=values,
    )


# ---------------------------------------------------------------- from tensor shapes


def _count_blocks(state_dict, stack):
    pattern = re.compile(rf"^{stack}\.(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    if indices and indices != set(range(max(indices) + 1)):
        raise ValueError(f"state_dict: {stack} block indices are not contiguous: {sorted(indices)}")
    return len(indices)


def _shape(state_dict, key):
    if key not in state_dict:
        raise ValueError(f"state_dict: '{key}' is missing (expected a ComfyUI-named NextDiT state dict)")
    return tuple(state_dict[key].shape)


def unet_config_from_state_dict(state_dict, overrides=None):
    """ComfyUI unet_config from the tensor shapes of a ComfyUI-named NextDiT state dict.

    ``overrides`` may set any of :data:`NOT_IN_TENSORS` (values the shapes cannot tell); the rest
    come from :data:`FAMILY_DEFAULTS` and the axes_dims rule in the module docstring.
    """
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - set(NOT_IN_TENSORS))
    if bad:
        raise ValueError(f"overrides: {bad} can be read from the tensors; only {NOT_IN_TENSORS} may be given")
    family = detect_comfy_family(state_dict)

    dim, cap_feat_dim = _shape(state_dict, "cap_embedder.1.weight")
    values = dict(FAMILY_DEFAULTS[family])
    values.update(overrides)
    patch_size = int(values["patch_size"])
    patch_in = _shape(state_dict, "x_embedder.weight")[1]
    if patch_in % (patch_size * patch_size):
        raise ValueError(
            f"state_dict: x_embedder.weight has {patch_in} inputs, not a multiple of patch_size² = {patch_size**2}"
        )

    n_layers = _count_blocks(state_dict, "layers")
    n_refiner = _count_blocks(state_dict, "noise_refiner")
    n_context = _count_blocks(state_dict, "context_refiner")
    if n_layers == 0:
        raise ValueError("state_dict: no 'layers.N.' blocks found")
    if n_refiner != n_context:
        raise ValueError(
            f"state_dict: {n_refiner} noise_refiner but {n_context} context_refiner blocks; NextDiT needs equal counts"
        )

    if "layers.0.attention.q_norm.weight" not in state_dict:
        raise ValueError(
            "state_dict: no layers.0.attention.q_norm.weight, so the head size is unknown; build from config.json instead"
        )
    (head_dim,) = _shape(state_dict, "layers.0.attention.q_norm.weight")
    if dim % head_dim:
        raise ValueError(f"state_dict: dim {dim} is not a multiple of the head size {head_dim} (from q_norm)")
    n_heads = dim // head_dim
    qkv_rows = _shape(state_dict, "layers.0.attention.qkv.weight")[0]
    kv_rows = qkv_rows - dim
    if kv_rows <= 0 or kv_rows % (2 * head_dim):
        raise ValueError(
            f"state_dict: layers.0.attention.qkv.weight has {qkv_rows} rows; expected dim {dim} + 2 * n_kv_heads * {head_dim}"
        )
    values.setdefault("axes_dims", None)
    if values["axes_dims"] is None:
        values["axes_dims"] = _axes_dims(head_dim, family)

    config = _assemble(
        family,
        in_channels=patch_in // (patch_size * patch_size),
        dim=dim,
        n_layers=n_layers,
        n_refiner_layers=n_refiner,
        n_heads=n_heads,
        n_kv_heads=kv_rows // (2 * head_dim),
        ffn_width=_shape(state_dict, "layers.0.feed_forward.w1.weight")[0],
        qk_norm=True,
        cap_feat_dim=cap_feat_dim,
        pad_tokens="cap_pad_token" in state_dict,
        values=values,
    )
    if family == ZIMAGE and dim < Z_IMAGE_MIN_DIM:
        raise ValueError(
            f"state_dict: Z-Image with dim {dim} < {Z_IMAGE_MIN_DIM}: its timestep embedder "
            f"{_shape(state_dict, 't_embedder.mlp.0.weight')} cannot be held by ComfyUI's NextDiT, which builds 256->dim->256"
        )
    return config


# ---------------------------------------------------------------- config vs tensors


def _meta_nextdit(unet_config):
    """The NextDiT ComfyUI builds for ``unet_config``, on the meta device (no memory)."""
    import comfy.ldm.lumina.model
    import comfy.ops
    import torch

    dim, n_heads, n_kv = unet_config["dim"], unet_config["n_heads"], unet_config["n_kv_heads"]
    if dim % n_heads or n_heads % n_kv:
        raise ValueError(
            f"unet_config: dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv}: need dim % n_heads == 0 and n_heads % n_kv_heads == 0"
        )
    if sum(unet_config["axes_dims"]) != dim // n_heads or any(a % 2 for a in unet_config["axes_dims"]):
        raise ValueError(
            f"unet_config: axes_dims {unet_config['axes_dims']} must be even and sum to the head size {dim // n_heads}"
        )
    return comfy.ldm.lumina.model.NextDiT(
        **unet_config,
        device=torch.device("meta"),
        dtype=torch.float32,
        operations=comfy.ops.disable_weight_init,
    )


def expected_shapes(unet_config):
    """Parameter name -> shape of the NextDiT ComfyUI builds for ``unet_config``."""
    return {k: tuple(v.shape) for k, v in _meta_nextdit(unet_config).state_dict().items()}


def linear_modules(unet_config):
    """Names of the Linear layers of that NextDiT (the layers ComfyUI's scaled fp8 operations scale)."""
    import torch

    return {n for n, m in _meta_nextdit(unet_config).named_modules() if isinstance(m, torch.nn.Linear)}


def validate_unet_config(unet_config, state_dict):
    """Raise ValueError unless ``state_dict`` has exactly the keys and shapes ``unet_config`` builds."""
    expected = expected_shapes(unet_config)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not match unet_config: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, shape in expected.items():
        actual = tuple(state_dict[key].shape)
        if actual != shape:
            raise ValueError(f"state_dict['{key}'] has shape {actual} but the config gives {shape}")
