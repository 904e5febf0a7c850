"""LoRA key layouts -> ComfyUI NextDiT targets, and the native conversion math (pure, no ComfyUI)."""

import pytest
import torch

from lumina_turbo.loading.errors import ModelFileError
from lumina_turbo.lora import convert as lora_convert
from lumina_turbo.lora import keys as lora_keys


@pytest.mark.parametrize(
    "stem, key, part",
    [
        ("diffusion_model.layers.3.attention.qkv", "layers.3.attention.qkv.weight", None),
        ("lora_unet_layers_3_attention_qkv", "layers.3.attention.qkv.weight", None),
        ("lora_unet_layers_3_attention_to_q", "layers.3.attention.qkv.weight", "q"),  # musubi raw
        ("transformer.layers.3.attn.to_k", "layers.3.attention.qkv.weight", "k"),  # diffusers Lumina-2
        ("layers.3.attn.to_v", "layers.3.attention.qkv.weight", "v"),  # PEFT, no prefix
        ("diffusion_model.layers.3.attention.to_v", "layers.3.attention.qkv.weight", "v"),  # ai-toolkit
        ("transformer.layers.0.feed_forward.linear_1", "layers.0.feed_forward.w1.weight", None),
        ("transformer.layers.0.norm1.linear", "layers.0.adaLN_modulation.1.weight", None),
        ("diffusion_model.layers.0.adaLN_modulation.0", "layers.0.adaLN_modulation.0.weight", None),
        ("transformer.noise_refiner.1.attn.to_out.0", "noise_refiner.1.attention.out.weight", None),
        ("lycoris_context_refiner_0_attention_to_out_0", "context_refiner.0.attention.out.weight", None),
        ("lora_transformer_layers_2_feed_forward_linear_3", "layers.2.feed_forward.w3.weight", None),
        ("base_model.model.layers.1.attn.to_q", "layers.1.attention.qkv.weight", "q"),
        ("transformer.all_x_embedder.2-1", "x_embedder.weight", None),
        ("lora_unet_all_final_layer_2-1_linear", "final_layer.linear.weight", None),
        ("transformer.norm_out.linear_2", "final_layer.linear.weight", None),
        ("transformer.time_caption_embed.caption_embedder.1", "cap_embedder.1.weight", None),
        ("diffusion_model.x_pad_token", "x_pad_token", None),
    ],
)
def test_every_layout_resolves_to_the_comfy_weight(stem, key, part):
    target, _ = lora_keys.resolve_module(stem)
    assert (target.key, target.part) == (key, part)


@pytest.mark.parametrize(
    "stem",
    [
        "lora_unet_down_blocks_0_attentions_0_proj_in",  # SDXL
        "transformer.single_transformer_blocks.0.attn.to_q",  # Flux
        "diffusion_model.layers.3.attention.nonsense",
        "layers_3_attention_qkv",  # underscores without a kohya prefix
    ],
)
def test_foreign_names_do_not_resolve(stem):
    assert lora_keys.resolve_module(stem) is None


def test_split_adapter_key_prefers_the_longest_suffix():
    assert lora_keys.split_adapter_key("a.b.lora_B.default.weight") == ("a.b", ".lora_B.default.weight")
    assert lora_keys.split_adapter_key("a.b.lora_A") == ("a.b", ".lora_A")
    assert lora_keys.split_adapter_key("x_lora.up.weight") == ("x", "_lora.up.weight")
    assert lora_keys.split_adapter_key("layers.0.attention.qkv.weight") is None


def test_qkv_slices_follow_grouped_query_attention():
    assert lora_keys.qkv_slices((2304 + 768 + 768, 2304)) == {
        "q": (0, 2304),
        "k": (2304, 768),
        "v": (3072, 768),
    }
    assert lora_keys.qkv_slices((3 * 3840, 3840))["v"] == (7680, 3840)
    with pytest.raises(ValueError, match="does not split"):
        lora_keys.qkv_slices((97, 96))


def test_parse_groups_modules_and_reports_the_rest():
    sd = {
        "transformer.layers.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
        "transformer.layers.0.attn.to_q.lora_B.weight": torch.zeros(8, 2),
        "lora_te_model_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 8),
        "lora_unet_input_blocks_1_0_emb_layers_1.lora_up.weight": torch.zeros(8, 2),
        "some_metadata_tensor": torch.zeros(1),
    }
    parsed = lora_keys.parse_lora(sd)
    assert [m.stem for m in parsed.modules] == ["transformer.layers.0.attn.to_q"]
    assert [m.stem for m in parsed.text_encoder] == ["lora_te_model_layers_0_self_attn_q_proj"]
    assert parsed.unmapped == [
        "lora_unet_input_blocks_1_0_emb_layers_1.lora_up.weight",
        "some_metadata_tensor",
    ]
    assert parsed.layouts() == ["transformer. + diffusers Lumina-2 names"]


def _split_lora(gen, dim=8, kv=4, ranks=(2, 3, 1), alphas=(1.0, 6.0, None)):
    sd = {}
    for name, rows, rank, alpha in zip(("to_q", "to_k", "to_v"), (dim, kv, kv), ranks, alphas, strict=True):
        stem = f"lora_unet_layers_0_attention_{name}"
        sd[f"{stem}.lora_down.weight"] = torch.randn(rank, dim, generator=gen)
        sd[f"{stem}.lora_up.weight"] = torch.randn(rows, rank, generator=gen)
        if alpha is not None:
            sd[f"{stem}.alpha"] = torch.tensor(alpha)
    return sd


def test_native_fusion_reproduces_each_split_delta():
    gen = torch.Generator().manual_seed(0)
    sd = _split_lora(gen)
    native = lora_convert.to_comfy_native(lora_keys.parse_lora(sd), "x.safetensors")
    stem = "diffusion_model.layers.0.attention.qkv"
    up, down = native[f"{stem}.lora_up.weight"], native[f"{stem}.lora_down.weight"]
    delta = float(native[f"{stem}.alpha"]) / down.shape[0] * up @ down
    expected = []
    for name, alpha in (("to_q", 1.0), ("to_k", 6.0), ("to_v", None)):
        s = f"lora_unet_layers_0_attention_{name}"
        rank = sd[f"{s}.lora_down.weight"].shape[0]
        scale = 1.0 if alpha is None else alpha / rank
        expected.append(scale * sd[f"{s}.lora_up.weight"] @ sd[f"{s}.lora_down.weight"])
    torch.testing.assert_close(delta, torch.cat(expected), rtol=0, atol=1e-5)


def test_bad_files_name_the_file_and_the_first_offending_key():
    gen = torch.Generator().manual_seed(0)
    sd = _split_lora(gen)
    sd["lora_unet_layers_0_attention_to_k.lora_up.weight"][1, 1] = float("nan")
    with pytest.raises(
        ModelFileError, match=r"bad\.safetensors.*lora_unet_layers_0_attention_to_k\.lora_up\.weight.*NaN"
    ):
        lora_convert.validate_lora(sd, lora_keys.parse_lora(sd), "bad.safetensors")

    sd = _split_lora(gen)
    sd["lora_unet_layers_0_attention_to_q.lora_up.weight"] = torch.zeros(8, 5)
    with pytest.raises(
        ModelFileError, match=r"rank\.safetensors.*same rank.*attention_to_q\.lora_up\.weight"
    ):
        lora_convert.validate_lora(sd, lora_keys.parse_lora(sd), "rank.safetensors")

    sd = _split_lora(gen)
    del sd["lora_unet_layers_0_attention_to_v.lora_up.weight"]
    with pytest.raises(ModelFileError, match=r"attention_to_v\.lora_down\.weight' has no"):
        lora_convert.validate_lora(sd, lora_keys.parse_lora(sd), "half.safetensors")

    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2)}
    with pytest.raises(
        ModelFileError,
        match=r"sdxl\.safetensors: expected a Lumina-Image-2\.0 / Z-Image.*lora_unet_down_blocks",
    ):
        lora_convert.validate_lora(sdxl, lora_keys.parse_lora(sdxl), "sdxl.safetensors")

    sd = _split_lora(gen)
    shapes = {"layers.0.attention.qkv.weight": (96 + 48 + 48, 96)}  # the model is wider than the LoRA
    with pytest.raises(ModelFileError, match=r"size\.safetensors.*another|size\.safetensors.*this model"):
        lora_convert.validate_lora(sd, lora_keys.parse_lora(sd), "size.safetensors", shapes)
