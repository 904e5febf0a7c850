"""LTLoraLoader / LTLoraConvert through ComfyUI's real executor: a Lumina-2 diffusers-named LoRA that
the stock LoraLoaderModelOnly ignores changes the output with ours; bad files are refused by name."""

import logging

import pytest
import safetensors.torch
import torch
from test_lora_layouts import models, random_deltas, write_layout  # noqa: F401  (fixture)

from lumina_turbo.devtools.harness import PromptFailed, graph
from lumina_turbo.devtools.prompts import empty_latent, encode, ksampler, save_latent, tiny_loader

PREFIX = "tiny-random-test-lora-"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, models):  # noqa: F811
    import folder_paths

    folder = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(folder))
    deltas = random_deltas(models["lumina2"], seed=5)
    # transformer.layers.0.attn.to_q.lora_A.weight, ...
    good = write_layout(deltas, "lumina2", "diffusers_peft")
    files = {"diffusers": good}
    bad = dict(good)
    first = sorted(bad)[3]
    bad[first] = bad[first].clone()
    bad[first][0, 0] = float("nan")
    files["nan"] = bad
    files["sdxl"] = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
    }
    zimage_sized = write_layout(
        random_deltas(models["zimage"], seed=6, block_modules=()), "zimage", "musubi_raw"
    )
    files["zimage"] = zimage_sized
    # good keys plus modules this loader knows nothing of: applied in part, the rest reported
    partial = dict(good)
    for stem in ("transformer.layers.0.attn.to_gate", "transformer.layers.1.unknown_proj"):
        partial[f"{stem}.lora_A.weight"] = torch.zeros(4, 32)
        partial[f"{stem}.lora_B.weight"] = torch.zeros(32, 4)
    files["partial"] = partial
    rank = dict(good)
    up = next(k for k in sorted(rank) if k.endswith(".lora_B.weight"))
    rank[up] = rank[up][:, :-1].contiguous()  # its lora_A keeps the full rank
    files["rank"] = rank
    for name, sd in files.items():
        safetensors.torch.save_file(sd, str(folder / f"{PREFIX}{name}.safetensors"))
    return folder, first, up


def lora_prompt(lora, branches=("plain", "stock", "ours")):
    g = graph()
    loader = tiny_loader(g, "lumina2")
    pos = encode(g, "lumina2", loader.out(1), "a red cat")
    latent = empty_latent(g)
    ours = None
    for name in branches:
        model = loader.out(0)
        if name == "stock":
            model = g.node("LoraLoaderModelOnly", model=model, lora_name=lora, strength_model=1.0).out(0)
        elif name == "ours":
            ours = g.node("LTLoraLoader", model=model, lora_name=lora, strength_model=1.0, strength_clip=1.0)
            model = ours.out(0)
        sampled = ksampler(g, model, pos.out(0), pos.out(0), latent.out(0), seed=2, steps=1)
        save_latent(g, sampled.out(0), f"{name}_lora")
    return g.finalize(), ours


def test_stock_loader_ignores_a_diffusers_lumina2_lora_ours_applies_it(comfy_host, lora_dir, caplog):
    prompt, ours = lora_prompt(f"{PREFIX}diffusers.safetensors")
    with caplog.at_level(logging.WARNING):
        outputs = comfy_host.run(prompt)
    assert any(
        "lora key not loaded: transformer.layers.0.attn.to_q" in r.getMessage() for r in caplog.records
    )
    lat = comfy_host.latents(outputs)
    assert torch.equal(lat["stock"], lat["plain"])  # ComfyUI 0.3.75 drops every key of this file
    assert torch.isfinite(lat["ours"]).all() and (lat["ours"] - lat["plain"]).abs().max() > 1e-3
    report = outputs[ours.id]["text"][0]
    assert "transformer. + diffusers Lumina-2 names" in report and "unmapped keys: 0" in report


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "nan",
            r"tiny-random-test-lora-nan\.safetensors: expected finite LoRA weights \(tensor '{first}' holds NaN",
        ),
        (
            "sdxl",
            r"tiny-random-test-lora-sdxl\.safetensors: expected a Lumina-Image-2\.0 / Z-Image .*lora_unet_down_blocks",
        ),
        (
            "zimage",
            r"tiny-random-test-lora-zimage\.safetensors: expected a LoRA made for this model .*lora_unet_",
        ),
    ],
)
def test_bad_files_are_refused_by_name(comfy_host, lora_dir, name, message):
    prompt, _ = lora_prompt(f"{PREFIX}{name}.safetensors", branches=("ours",))
    with pytest.raises(PromptFailed, match=message.replace("{first}", lora_dir[1].replace(".", r"\."))):
        comfy_host.run(prompt)


def test_rank_mismatch_is_refused_naming_the_key(comfy_host, lora_dir):
    prompt, _ = lora_prompt(f"{PREFIX}rank.safetensors", branches=("ours",))
    stem = lora_dir[2][: -len(".lora_B.weight")]
    with pytest.raises(
        PromptFailed,
        match=r"tiny-random-test-lora-rank\.safetensors: expected LoRA up/down "
        rf"weights of the same rank .*{stem.replace('.', chr(92) + '.')}",
    ):
        comfy_host.run(prompt)


def test_unmapped_keys_are_reported_not_ignored(comfy_host, lora_dir, caplog):
    """The keys it can map are applied; the others are counted and named in the report and the log."""
    prompt, ours = lora_prompt(f"{PREFIX}partial.safetensors", branches=("plain", "ours"))
    with caplog.at_level(logging.WARNING):
        outputs = comfy_host.run(prompt)
    report = outputs[ours.id]["text"][0]
    assert "unmapped keys (NOT applied): 4; first: transformer.layers.0.attn.to_gate.lora_A.weight" in report
    assert "transformer.layers.1.unknown_proj.lora_B.weight" in report
    assert any(
        "4 key(s) not applied" in r.getMessage() and "to_gate" in r.getMessage() for r in caplog.records
    )
    lat = comfy_host.latents(outputs)
    assert (lat["ours"] - lat["plain"]).abs().max() > 1e-3  # the mappable keys were applied


def test_unknown_file_is_refused_at_validation(comfy_host, lora_dir):
    prompt, _ = lora_prompt("no-such-lora.safetensors", branches=("ours",))
    with pytest.raises(PromptFailed, match="lora_name: 'no-such-lora.safetensors' is not a file"):
        comfy_host.run(prompt)


def test_convert_node_writes_a_native_file_once(comfy_host, lora_dir, caplog):
    folder = lora_dir[0]
    g = graph()
    g.node(
        "LTLoraConvert",
        lora_name=f"{PREFIX}diffusers.safetensors",
        output_name=f"{PREFIX}converted",
        overwrite=False,
    )
    comfy_host.run(g.finalize())
    written = folder / f"{PREFIX}converted.safetensors"
    sd = safetensors.torch.load_file(str(written))
    assert sd and all(k.startswith("diffusion_model.") for k in sd)
    assert not list(folder.glob("*.tmp"))
    with pytest.raises(PromptFailed, match="exists; choose another name or set overwrite"):
        comfy_host.run(g.finalize())

    # the converted file loads in the stock loader with no warning and patches what ours patches
    import comfy.sd
    from test_lora_layouts import patched_weights

    from lumina_turbo.lora import apply as lora_apply

    model = _tiny_lumina2()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stock, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    ours, _, _ = lora_apply.apply_lora(model, None, folder / f"{PREFIX}diffusers.safetensors")
    keys = sorted({k if isinstance(k, str) else k[0] for k in ours.patches})
    names = [k[len("diffusion_model.") :] for k in keys]
    a, b = patched_weights(stock, names), patched_weights(ours, names)
    for key in names:
        assert (a[key] - b[key]).abs().max() <= 1e-5, key


def _tiny_lumina2():
    from lumina_turbo.devtools.harness import MODELS_DIR
    from lumina_turbo.loading import model_files

    return model_files.load_transformer_file(
        MODELS_DIR / "diffusion_models" / "tiny-random-lumina2.safetensors"
    )


def test_text_encoder_keys_patch_the_clip(lora_dir, tmp_path):
    from lumina_turbo.devtools.harness import MODELS_DIR
    from lumina_turbo.loading import model_files
    from lumina_turbo.lora import apply as lora_apply

    clip = model_files.load_text_encoder_file(MODELS_DIR / "text_encoders" / "tiny-random-gemma2.safetensors")
    model = _tiny_lumina2()
    sd = safetensors.torch.load_file(str(lora_dir[0] / f"{PREFIX}diffusers.safetensors"))
    hidden = 64  # the tiny Gemma-2's width
    for stem in ("lora_te_model_layers_0_self_attn_o_proj", "text_encoder.model.layers.1.mlp.gate_proj"):
        rows = 128 if "gate" in stem else hidden
        sd[f"{stem}.lora_down.weight"] = torch.randn(2, 512 if "o_proj" in stem else hidden) * 0.01
        sd[f"{stem}.lora_up.weight"] = torch.randn(rows, 2) * 0.01
    path = tmp_path / "with_te.safetensors"
    safetensors.torch.save_file(sd, str(path))
    _, new_clip, report = lora_apply.apply_lora(model, clip, path, 1.0, 0.5)
    assert report.clip_patched == 2 and report.unmapped == []
    _, no_clip, report = lora_apply.apply_lora(model, None, path)
    assert no_clip is None and len(report.text_encoder_skipped) == 4


def test_foreign_lora_example_applies_every_key(comfy_host):
    """example_workflows/api/foreign_lora.json (the tiny diffusers-layout Z-Image LoRA), 1 step."""
    import json

    from lumina_turbo.devtools.comfy_host import REPO

    prompt = json.loads((REPO / "example_workflows" / "api" / "foreign_lora.json").read_text())
    kinds = {v["class_type"]: k for k, v in prompt.items()}
    prompt[kinds["KSampler"]]["inputs"]["steps"] = 1
    outputs = comfy_host.run(prompt)
    report = outputs[kinds["LTLoraLoader"]]["text"][0]
    assert "transformer. + diffusers Z-Image names" in report and "unmapped keys: 0" in report
    assert len(comfy_host.image_paths(outputs)) == 1
