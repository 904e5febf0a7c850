"""Oracle parity: diffusers Lumina-2 / Z-Image transformers vs ComfyUI's NextDiT built by models/.

Conventions under test (see models/nextdit_keys.py): with ComfyUI sigma s,
``comfy_diffusion_model(x, s, ctx, n) == -diffusers_transformer(x, t=1 - s, ctx)`` and
``BaseModel.apply_model(x, s, ...) == x + s * diffusers_transformer(x, 1 - s, ...)``.
"""

import copy

import pytest
import torch

from lumina_turbo.devtools.comfy_host import bootstrap

bootstrap()

from lumina_turbo.devtools import tiny_transformers  # noqa: E402
from lumina_turbo.loading import nextdit_build, nextdit_config, nextdit_keys  # noqa: E402

CAP_LEN = 7  # not a multiple of 32, so Z-Image's caption pad tokens are exercised
CASES = {"square": (1, 8, 8), "non_square": (1, 8, 12), "batch2": (2, 8, 8)}
REL_TOL = 1e-4


class Family:
    """One tiny diffusers transformer, its ComfyUI twin, and how to call the diffusers one."""

    def __init__(self, name, make):
        self.name = name
        self.diffusers = make(seed=0)
        self.config_json = dict(self.diffusers.config)
        self.comfy_sd = nextdit_keys.diffusers_to_comfy(self.diffusers.state_dict())
        self.unet_config = nextdit_config.unet_config_from_diffusers_config(self.config_json)
        self.patcher = nextdit_build.build_nextdit(self.comfy_sd, self.unet_config)
        self.cap_dim = self.unet_config["cap_feat_dim"]

    def diffusers_velocity_input(self, x, t, ctx, cap_mask=None):
        return diffusers_output(self.diffusers, self.name, x, t, ctx, cap_mask)


@torch.no_grad()
def diffusers_output(model, family, x, t, ctx, cap_mask=None):
    """The raw output of a diffusers Lumina-2 / Z-Image transformer for Lumina time t (= 1 - sigma)."""
    if family == "lumina2":
        mask = torch.ones(ctx.shape[:2], dtype=torch.bool) if cap_mask is None else cap_mask
        return model(x, t, ctx, mask, return_dict=False)[0]
    # Z-Image takes lists of (C, F=1, H, W) latents and per-sample (L, cap_dim) features
    out = model(list(x.unsqueeze(2).unbind(0)), t, list(ctx.unbind(0)), return_dict=False)[0]
    return torch.stack(out).squeeze(2)


@pytest.fixture(scope="module", params=["lumina2", "zimage"])
def family(request):
    make = {
        "lumina2": tiny_transformers.tiny_lumina2_transformer,
        "zimage": tiny_transformers.tiny_zimage_transformer,
    }
    return Family(request.param, make[request.param])


def make_inputs(case, cap_dim, seed=1):
    batch, height, width = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, height, width, generator=g)
    ctx = torch.randn(batch, CAP_LEN, cap_dim, generator=g)
    sigma = torch.rand(batch, generator=g) * 0.9 + 0.05
    return x, ctx, sigma


def rel_err(got, ref):
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_comfy_model_matches_diffusers(family, case):
    x, ctx, sigma = make_inputs(case, family.cap_dim)
    ref = family.diffusers_velocity_input(x, 1 - sigma, ctx)
    assert torch.isfinite(ref).all() and ref.abs().max() > 0.1
    model = family.patcher.model
    with torch.no_grad():
        raw = model.diffusion_model(x, sigma, ctx, CAP_LEN, attention_mask=None)
        denoised = model.apply_model(x, sigma, c_crossattn=ctx, num_tokens=CAP_LEN)
    assert raw.shape == x.shape
    assert rel_err(-raw, ref) <= REL_TOL
    # the pipelines hand the scheduler -ref as the flow velocity; ComfyUI's CONST sampling denoises with it
    assert rel_err(denoised, x - sigma.view(-1, 1, 1, 1) * -ref) <= REL_TOL


def test_prediction_depends_on_time_and_caption(family):
    x, ctx, sigma = make_inputs("square", family.cap_dim, seed=3)
    model = family.patcher.model.diffusion_model
    with torch.no_grad():
        base = model(x, sigma, ctx, CAP_LEN)
        other_time = model(x, 1 - sigma, ctx, CAP_LEN)
        other_caption = model(x, sigma, -ctx, CAP_LEN)
    assert (base - other_time).abs().max() > 1e-2
    assert (base - other_caption).abs().max() > 1e-2


def test_lumina2_padded_caption_equals_comfy_with_valid_tokens():
    """diffusers drops masked caption tokens; ComfyUI gets only the valid ones (no attention_mask)."""
    fam = Family("lumina2", tiny_transformers.tiny_lumina2_transformer)
    x, ctx, sigma = make_inputs("batch2", fam.cap_dim, seed=4)
    valid = 5
    mask = torch.zeros(ctx.shape[:2], dtype=torch.bool)
    mask[:, :valid] = True
    ref = fam.diffusers_velocity_input(x, 1 - sigma, ctx, cap_mask=mask)
    with torch.no_grad():
        got = fam.patcher.model.diffusion_model(x, sigma, ctx[:, :valid], valid)
    assert rel_err(-got, ref) <= REL_TOL


def test_config_from_shapes_equals_config_json(family):
    assert nextdit_config.unet_config_from_state_dict(family.comfy_sd) == family.unet_config
    nextdit_config.validate_unet_config(family.unet_config, family.comfy_sd)


def test_tiny_unet_configs():
    lumina = nextdit_config.unet_config_from_diffusers_config(tiny_transformers.TINY_LUMINA2_CONFIG)
    assert (lumina["n_heads"], lumina["n_kv_heads"], lumina["z_image_modulation"]) == (4, 2, False)
    assert nextdit_config.comfy_ffn_width(96, lumina["ffn_dim_multiplier"], lumina["multiple_of"]) == 384
    zimage = nextdit_config.unet_config_from_diffusers_config(tiny_transformers.TINY_ZIMAGE_CONFIG)
    assert (zimage["time_scale"], zimage["rope_theta"], zimage["pad_tokens_multiple"]) == (1000.0, 256.0, 32)
    assert nextdit_config.comfy_ffn_width(1024, zimage["ffn_dim_multiplier"], zimage["multiple_of"]) == 2730


@pytest.mark.parametrize(
    ("family_name", "edit", "key"),
    [
        ("lumina2", {"num_kv_heads": 4}, "attention.qkv.weight"),
        ("lumina2", {"multiple_of": 256}, "feed_forward.w1.weight"),
        ("lumina2", {"cap_feat_dim": 48}, "cap_embedder"),
        ("zimage", {"n_heads": 16, "axes_dims": [16, 24, 24]}, "q_norm.weight"),
    ],
)
def test_config_that_disagrees_with_tensors_raises(family_name, edit, key):
    tiny = {"lumina2": tiny_transformers.TINY_LUMINA2_CONFIG, "zimage": tiny_transformers.TINY_ZIMAGE_CONFIG}
    good = nextdit_config.unet_config_from_diffusers_config(tiny[family_name])
    bad = nextdit_config.unet_config_from_diffusers_config({**tiny[family_name], **edit})
    state_dict = {k: torch.empty(v, device="meta") for k, v in nextdit_config.expected_shapes(good).items()}
    with pytest.raises(ValueError, match=key) as info:
        nextdit_config.validate_unet_config(bad, state_dict)
    assert "shape" in str(info.value)


def test_build_rejects_missing_and_unknown_keys(family):
    state_dict = dict(family.comfy_sd)
    del state_dict["layers.0.ffn_norm2.weight"]
    with pytest.raises(ValueError, match=r"missing \['layers.0.ffn_norm2.weight'\]"):
        nextdit_build.build_nextdit(state_dict, family.unet_config)
    with pytest.raises(ValueError, match="not part of a diffusers"):
        nextdit_keys.diffusers_to_comfy(
            {**family.diffusers.state_dict(), "layers.0.attn.extra.weight": torch.zeros(1)}
        )


def test_zimage_below_1024_is_refused():
    config = {**tiny_transformers.TINY_ZIMAGE_CONFIG, "dim": 512, "n_heads": 4}
    with pytest.raises(ValueError, match="dim 512 < 1024"):
        nextdit_config.unet_config_from_diffusers_config(config)


def test_gqa_qkv_is_q_then_k_then_v():
    diffusers_sd = tiny_transformers.tiny_lumina2_transformer(seed=5).state_dict()
    qkv = nextdit_keys.diffusers_to_comfy(diffusers_sd)["layers.0.attention.qkv.weight"]
    q, k, v = (diffusers_sd[f"layers.0.attn.to_{n}.weight"] for n in "qkv")
    assert qkv.shape == (96 + 2 * 48, 96)
    assert torch.equal(qkv, torch.cat((q, k, v)))


def test_dtype_option_and_default():
    fam_sd = nextdit_keys.diffusers_to_comfy(tiny_transformers.tiny_lumina2_transformer(seed=0).state_dict())
    default = nextdit_build.build_nextdit(fam_sd)
    assert default.model.diffusion_model.x_embedder.weight.dtype == torch.float32
    half = nextdit_build.build_nextdit_from_diffusers(
        tiny_transformers.tiny_lumina2_transformer(seed=0).state_dict(),
        copy.deepcopy(tiny_transformers.TINY_LUMINA2_CONFIG),
        dtype=torch.bfloat16,
    )
    assert half.model.diffusion_model.x_embedder.weight.dtype == torch.bfloat16


def test_tiny_transformers_are_seeded():
    a = tiny_transformers.tiny_lumina2_transformer(seed=0).state_dict()
    b = tiny_transformers.tiny_lumina2_transformer(seed=0).state_dict()
    c = tiny_transformers.tiny_lumina2_transformer(seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["norm_out.linear_2.weight"], c["norm_out.linear_2.weight"])
    assert all(v.abs().sum() > 0 for v in a.values())


REAL_LUMINA2 = {
    "_class_name": "Lumina2Transformer2DModel",
    "hidden_size": 2304,
    "num_layers": 26,
    "num_refiner_layers": 2,
    "num_attention_heads": 24,
    "num_kv_heads": 8,
    "multiple_of": 256,
    "ffn_dim_multiplier": None,
    "axes_dim_rope": [32, 32, 32],
    "axes_lens": [300, 512, 512],
    "cap_feat_dim": 2304,
}
REAL_ZIMAGE = {
    "_class_name": "ZImageTransformer2DModel",
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "cap_feat_dim": 2560,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}


@pytest.mark.parametrize("config", [REAL_LUMINA2, REAL_ZIMAGE], ids=["lumina2", "zimage"])
def test_published_sizes_agree_with_comfy_detection(config):
    """At the two sizes ComfyUI hard-codes, our config (from json and from shapes) equals its detection."""
    import comfy.model_detection
    import diffusers

    kwargs = {k: v for k, v in config.items() if k != "_class_name"}
    with torch.device("meta"):
        model = getattr(diffusers, config["_class_name"])(**kwargs)
    state_dict = nextdit_keys.diffusers_to_comfy(model.state_dict())
    from_json = nextdit_config.unet_config_from_diffusers_config(config)
    assert nextdit_config.unet_config_from_state_dict(state_dict) == from_json
    nextdit_config.validate_unet_config(from_json, state_dict)
    detected = comfy.model_detection.detect_unet_config(state_dict, "")
    assert {k: from_json[k] for k in detected} == detected


def test_overrides_fill_only_what_tensors_cannot_tell(family):
    config = nextdit_config.unet_config_from_state_dict(family.comfy_sd, overrides={"rope_theta": 500.0})
    assert config == {**family.unet_config, "rope_theta": 500.0}
    with pytest.raises(ValueError, match="can be read from the tensors"):
        nextdit_config.unet_config_from_state_dict(family.comfy_sd, overrides={"n_heads": 2})
