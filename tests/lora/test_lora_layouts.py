"""The same random low-rank deltas written in every LoRA layout patch the same weights.

Each layout is written here from the test's own name tables and fusion (not the pack's), loaded by
LTLoraLoader's core (``lora_apply.apply_lora``) into the tiny Lumina-2 (grouped-query attention) and
Z-Image models, and the weights ComfyUI's ModelPatcher patches are compared with W + sum of deltas
computed directly. The converter's output must give the same weights through ComfyUI's stock
``load_lora_for_models`` with no "lora key not loaded" warning.
"""

import logging
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from lumina_turbo.devtools.comfy_host import REPO, bootstrap
from lumina_turbo.lora import apply as lora_apply

QKV = "attention.qkv"
# diffusers module names per family, written out independently of models/nextdit_keys.py
DIFFUSERS_BLOCK = {
    "lumina2": {
        "q": "attn.to_q",
        "k": "attn.to_k",
        "v": "attn.to_v",
        "attention.out": "attn.to_out.0",
        "feed_forward.w1": "feed_forward.linear_1",
        "feed_forward.w2": "feed_forward.linear_2",
        "feed_forward.w3": "feed_forward.linear_3",
        "adaLN_modulation.1": "norm1.linear",
    },
    "zimage": {
        "q": "attention.to_q",
        "k": "attention.to_k",
        "v": "attention.to_v",
        "attention.out": "attention.to_out.0",
        "feed_forward.w1": "feed_forward.w1",
        "feed_forward.w2": "feed_forward.w2",
        "feed_forward.w3": "feed_forward.w3",
        "adaLN_modulation.0": "adaLN_modulation.0",
    },
}
DIFFUSERS_TOP = {
    "lumina2": {"x_embedder": "x_embedder", "final_layer.linear": "norm_out.linear_2"},
    "zimage": {"x_embedder": "all_x_embedder.2-1", "final_layer.linear": "all_final_layer.2-1.linear"},
}
# layout -> (prefix, module names, underscored, up/down suffixes, writes alpha)
LAYOUTS = {
    "comfy_native": ("diffusion_model.", "native", False, (".lora_up.weight", ".lora_down.weight"), True),
    "kohya": ("lora_unet_", "native", True, (".lora_up.weight", ".lora_down.weight"), True),
    "diffusers_peft": ("transformer.", "diffusers", False, (".lora_B.weight", ".lora_A.weight"), False),
    "peft_bare": ("", "diffusers", False, (".lora_B.weight", ".lora_A.weight"), False),
    "peft_default_adapter": (
        "base_model.model.",
        "diffusers",
        False,
        (".lora_B.default.weight", ".lora_A.default.weight"),
        False,
    ),
    "ai_toolkit": ("diffusion_model.", "diffusers", False, (".lora_B.weight", ".lora_A.weight"), False),
    "musubi_raw": ("lora_unet_", "diffusers", True, (".lora_up.weight", ".lora_down.weight"), True),
    "lycoris": ("lycoris_", "diffusers", True, (".lora_up.weight", ".lora_down.weight"), True),
    "onetrainer": ("lora_transformer_", "diffusers", True, (".lora_up.weight", ".lora_down.weight"), True),
}


def model_file(tiny_models, family):
    return tiny_models / "diffusion_models" / f"tiny-random-{family}.safetensors"


@pytest.fixture(scope="module")
def models(tiny_models):
    bootstrap()
    from lumina_turbo.loading import model_files

    return {
        family: model_files.load_transformer_file(model_file(tiny_models, family))
        for family in ("lumina2", "zimage")
    }


BLOCK_MODULES = (
    "attention.out",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
    "adaLN_modulation.0",
    "adaLN_modulation.1",
)
# the 1024-wide Z-Image FFNs cost seconds per patch on 2 cores; Lumina-2 covers their names
LIGHT_BLOCK_MODULES = ("attention.out", "adaLN_modulation.0", "adaLN_modulation.1")


def random_deltas(model, seed=0, block_modules=BLOCK_MODULES):
    """{(module, part): (up, down, alpha)}: q/k/v and ``block_modules`` of every block, two top-level weights."""
    sd = model.model.diffusion_model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    blocks = sorted(
        {
            ".".join(k.split(".")[:2])
            for k in sd
            if k.split(".")[0] in ("layers", "noise_refiner", "context_refiner")
        }
    )
    for block in blocks:
        modules = [f"{block}.{m}" for m in block_modules if f"{block}.{m}.weight" in sd]
        for i, module in enumerate(modules):
            deltas[(module, None)] = (2 + i % 3, 1.5)
        for part, rank, alpha in (("q", 2, 1.0), ("k", 3, 6.0), ("v", 4, 4.0)):
            deltas[(f"{block}.{QKV}", part)] = (rank, alpha)
    for module in ("x_embedder", "final_layer.linear"):
        deltas[(module, None)] = (3, 3.0)
    out = {}
    for (module, part), (rank, alpha) in deltas.items():
        rows, cols = sd[f"{module}.weight"].shape
        if part is not None:
            dim = cols
            rows = dim if part == "q" else (rows - dim) // 2
        down = torch.randn(rank, cols, generator=gen) / cols**0.5
        up = torch.randn(rows, rank, generator=gen) / rank**0.5
        out[(module, part)] = (up, down, alpha)
    return out


def expected_weights(model, deltas):
    sd = model.model.diffusion_model.state_dict()
    out = {}
    for (module, part), (up, down, alpha) in deltas.items():
        key = f"{module}.weight"
        weight = out.setdefault(key, sd[key].clone().float())
        delta = alpha / down.shape[0] * up @ down
        if part is None:
            weight += delta
        else:
            dim = weight.shape[1]
            kv = (weight.shape[0] - dim) // 2
            start = {"q": 0, "k": dim, "v": dim + kv}[part]
            weight[start : start + delta.shape[0]] += delta
    return out


def write_layout(deltas, family, layout):
    prefix, names, underscored, (up_suffix, down_suffix), with_alpha = LAYOUTS[layout]
    sd = {}

    def put(name, up, down, alpha):
        if underscored:
            name = name.replace(".", "_")
        if with_alpha:
            sd[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
        else:  # PEFT files carry no alpha: fold alpha / rank into up
            up = up * (alpha / down.shape[0])
        sd[f"{prefix}{name}{up_suffix}"] = up.contiguous()
        sd[f"{prefix}{name}{down_suffix}"] = down.contiguous()

    fused = {}
    for (module, part), (up, down, alpha) in deltas.items():
        if names == "native" and part is not None:
            fused.setdefault(module, {})[part] = (up, down, alpha)
            continue
        block = module[: -len(".attention.qkv")] if part is not None else None
        if names == "native":
            put(module, up, down, alpha)
        elif part is not None:
            put(f"{block}.{DIFFUSERS_BLOCK[family][part]}", up, down, alpha)
        elif module in DIFFUSERS_TOP[family]:
            put(DIFFUSERS_TOP[family][module], up, down, alpha)
        else:
            stack, index, local = module.split(".", 2)
            put(f"{stack}.{index}.{DIFFUSERS_BLOCK[family][local]}", up, down, alpha)
    for module, parts in fused.items():  # block-diagonal fusion into one qkv LoRA, alpha = total rank
        ups = [parts[p][0] * (parts[p][2] / parts[p][1].shape[0]) for p in ("q", "k", "v")]
        downs = [parts[p][1] for p in ("q", "k", "v")]
        put(module, torch.block_diag(*ups), torch.cat(downs), float(sum(d.shape[0] for d in downs)))
    return sd


def patched_weights(patcher, keys):
    patcher.patch_model()
    try:
        sd = patcher.model.diffusion_model.state_dict()
        return {key: sd[key].clone().float() for key in keys}
    finally:
        patcher.unpatch_model()


def assert_weights(patcher, expected):
    got = patched_weights(patcher, expected)
    for key, value in expected.items():
        assert (got[key] - value).abs().max() <= 1e-5, key


@pytest.mark.parametrize("family", ["lumina2", "zimage"])
def test_every_layout_patches_the_same_weights(models, family, tmp_path, caplog):
    model = models[family]
    deltas = random_deltas(model, block_modules=BLOCK_MODULES if family == "lumina2" else LIGHT_BLOCK_MODULES)
    expected = expected_weights(model, deltas)
    import comfy.sd

    for layout in LAYOUTS:
        path = tmp_path / f"{layout}.safetensors"
        safetensors.torch.save_file(write_layout(deltas, family, layout), str(path))
        patched, _, report = lora_apply.apply_lora(model, None, path, 1.0, 1.0)
        assert report.unmapped == [], (layout, report.text())
        assert_weights(patched, expected)

        if family == "zimage" and layout not in ("musubi_raw", "diffusers_peft"):
            continue  # the converter is layout-independent after parsing; two Z-Image layouts suffice
        # the converter's native file loads in ComfyUI's stock loader, no key left behind
        native = tmp_path / f"{layout}_comfy.safetensors"
        lora_apply.convert_file(path, native, lora_apply.target_shapes(model))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            stock, _ = comfy.sd.load_lora_for_models(
                model, None, safetensors.torch.load_file(str(native)), 1.0, 0.0
            )
        assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()], layout
        assert_weights(stock, expected)


def test_strength_scales_like_comfy(models, tmp_path):
    model = models["lumina2"]
    deltas = random_deltas(model, seed=1)
    path = tmp_path / "half.safetensors"
    safetensors.torch.save_file(write_layout(deltas, "lumina2", "diffusers_peft"), str(path))
    base = model.model.diffusion_model.state_dict()
    full = expected_weights(model, deltas)
    half = {k: base[k].float() + 0.5 * (v - base[k].float()) for k, v in full.items()}
    patched, _, _ = lora_apply.apply_lora(model, None, path, 0.5, 1.0)
    assert_weights(patched, half)


def test_converter_command_line(models, tiny_models, tmp_path):
    model = models["zimage"]
    deltas = random_deltas(model, seed=2, block_modules=LIGHT_BLOCK_MODULES)
    src = tmp_path / "musubi.safetensors"
    safetensors.torch.save_file(write_layout(deltas, "zimage", "musubi_raw"), str(src))
    dst = tmp_path / "out.safetensors"
    script = str(REPO / "scripts" / "convert_lora.py")
    done = subprocess.run(
        [sys.executable, script, str(src), str(dst), "--model", str(model_file(tiny_models, "zimage"))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "kohya lora_unet_ + diffusers Z-Image names" in done.stdout
    import comfy.sd

    stock, _ = comfy.sd.load_lora_for_models(model, None, safetensors.torch.load_file(str(dst)), 1.0, 0.0)
    assert_weights(stock, expected_weights(model, deltas))
    again = subprocess.run(
        [sys.executable, script, str(src), str(dst)], capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrites silently
