"""fp8 weights through LTModelLoader and ComfyUI's real executor, on the tiny model files.

* weight_dtype fp8_*: every transformer tensor is stored in fp8 (as UNETLoader stores them) and the
  Linear layers are ComfyUI's manual-cast layers; the prediction equals the fp32 model whose weights
  were rounded to that fp8 format (compute in fp32 on the CPU: rel. 1e-5), and stays near the bf16
  model's (max-abs error / max |bf16 output| <= 0.15 for e4m3fn, 0.3 for e5m2: random tiny weights,
  every tensor in fp8, 3 or 2 mantissa bits);
* a scaled-fp8 file written by ComfyUI's conventions loads into exactly the model ComfyUI's own
  ``load_diffusion_model`` (UNETLoader) builds from it, and predicts what it predicts;
* bad input: fp8 where ComfyUI cannot store it, scales missing or mis-shaped: clear errors naming
  the input or the file.
"""

import pytest
import safetensors.torch
import torch
from test_nextdit_parity import CAP_LEN, make_inputs, rel_err

from lumina_turbo.devtools import tiny_factory
from lumina_turbo.devtools.harness import PromptFailed, graph
from lumina_turbo.devtools.prompts import empty_latent, ksampler, save_latent
from lumina_turbo.devtools.scaled_fp8 import write_scaled_fp8, write_scaled_fp8_text_encoder
from lumina_turbo.devtools.training_support import one_thread  # noqa: F401 (autouse: one torch thread)

FROM_FOLDER = "(from the diffusers folder)"
FP8 = {
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3fn_fast": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
TOLERANCE_VS_BF16 = {torch.float8_e4m3fn: 0.15, torch.float8_e5m2: 0.3}
ROUNDED_TOLERANCE = 1e-5


def file_choice(family, part):
    return tiny_factory.file_names(family)[part].split("/", 1)[1]


def loader_inputs(family, source, weight_dtype, model=None):
    if source == "folder":
        return dict(
            model=f"tiny-random-{family}",
            text_encoder=FROM_FOLDER,
            vae=FROM_FOLDER,
            weight_dtype=weight_dtype,
        )
    return dict(
        model=model or file_choice(family, "transformer"),
        text_encoder=file_choice(family, "text_encoder"),
        vae=file_choice(family, "vae"),
        weight_dtype=weight_dtype,
    )


def sampling_prompt(inputs):
    """LTModelLoader -> KSampler (2 steps) -> SaveLatent; returns (prompt, the loader's node id)."""
    g = graph()
    loader = g.node("LTModelLoader", **inputs)
    cond = g.node("CLIPTextEncode", text="a red cat", clip=loader.out(1))
    latent = empty_latent(g, width=64, height=64)
    sampled = ksampler(g, loader.out(0), cond.out(0), cond.out(0), latent.out(0), seed=4, steps=2)
    save_latent(g, sampled.out(0), "fp8")
    return g.finalize(), {"loader": loader.id, "cond": cond.id}


def output(comfy_host, node_id, index=0):
    """Output ``index`` of a node of the last prompt (from the executor's cache)."""
    return comfy_host.executor.caches.outputs.get(node_id).outputs[index][0]


def load_and_sample(comfy_host, inputs, with_cond=False):
    """Run :func:`sampling_prompt`; returns (the loader's MODEL, the sampled latent[, the conditioning,
    the loader's CLIP])."""
    prompt, ids = sampling_prompt(inputs)
    outputs = comfy_host.run(prompt)
    model = output(comfy_host, ids["loader"])
    if with_cond:
        return (
            model,
            comfy_host.latent(outputs),
            output(comfy_host, ids["cond"])[0][0],
            output(comfy_host, ids["loader"], 1),
        )
    return model, comfy_host.latent(outputs)


def predict(model, seed=3):
    cap = model.model.diffusion_model.cap_embedder[1].weight.shape[1]
    x, ctx, sigma = make_inputs("non_square", cap, seed=seed)
    with torch.no_grad():
        return model.model.apply_model(x, sigma, c_crossattn=ctx, num_tokens=CAP_LEN).float()


def fp32_model_from(model):
    """A fp32 model holding ``model``'s weights as they are stored (fp8 values, exactly representable)."""
    from lumina_turbo.loading import nextdit_build

    config = {k: v for k, v in model.model.model_config.unet_config.items() if k != "dtype"}
    weights = {k: t.float() for k, t in model.model.diffusion_model.state_dict().items()}
    return nextdit_build.build_nextdit(weights, config, dtype=torch.float32)


@pytest.fixture
def diffusion_models_root(tmp_path, comfy_host):
    import folder_paths

    folder_paths.add_model_folder_path("diffusion_models", str(tmp_path))
    yield tmp_path
    folder_paths.folder_names_and_paths["diffusion_models"][0].remove(str(tmp_path))


def test_fp8_choices_follow_the_existing_ones(comfy_host):
    import nodes

    schema = nodes.NODE_CLASS_MAPPINGS["LTModelLoader"].define_schema()
    (combo,) = [i for i in schema.inputs if i.id == "weight_dtype"]
    assert combo.options == ["default", "fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]


@pytest.mark.parametrize(
    "family,source,weight_dtype",
    [
        ("lumina2", "single", "fp8_e4m3fn"),
        ("zimage", "folder", "fp8_e5m2"),
        ("zimage", "single", "fp8_e4m3fn_fast"),
    ],
)
def test_fp8_weight_dtype_stores_fp8_and_predicts_like_the_rounded_model(
    comfy_host, family, source, weight_dtype
):
    import comfy.ops

    dtype = FP8[weight_dtype]
    model, latent = load_and_sample(comfy_host, loader_inputs(family, source, weight_dtype))
    weights = model.model.diffusion_model.state_dict()
    assert {t.dtype for t in weights.values()} == {dtype}
    qkv = model.model.diffusion_model.layers[0].attention.qkv
    assert isinstance(qkv, comfy.ops.manual_cast.Linear) and qkv.weight.dtype == dtype
    assert model.model.manual_cast_dtype == torch.float32  # the CPU computes in fp32
    assert torch.isfinite(latent).all() and latent.std() > 0.1

    got = predict(model)
    assert rel_err(got, predict(fp32_model_from(model))) <= ROUNDED_TOLERANCE
    bf16, _ = load_and_sample(comfy_host, loader_inputs(family, source, "bf16"))
    assert rel_err(got, predict(bf16)) <= TOLERANCE_VS_BF16[dtype]


# ---------------------------------------------------------------- pre-quantized scaled-fp8 files


def comfy_load(path, unet_config, monkeypatch):
    """ComfyUI's own UNETLoader path (``comfy.sd.load_diffusion_model``) for ``path``. ComfyUI detects
    NextDiT's head count and RoPE only at the released widths (2304, 3840), so its detection is told
    the tiny model's config; the rest (scaled_fp8 marker, operations, dtypes, weights) is ComfyUI's."""
    import comfy.model_detection
    import comfy.sd

    config = {k: v for k, v in unet_config.items() if k != "dtype"}
    monkeypatch.setattr(comfy.model_detection, "detect_unet_config", lambda *args, **kwargs: dict(config))
    return comfy.sd.load_diffusion_model(str(path))


@pytest.mark.parametrize("family", tiny_factory.FAMILIES)
def test_scaled_fp8_file_loads_as_comfyui_loads_it(
    comfy_host, tiny_models, diffusion_models_root, monkeypatch, family
):
    import comfy.ops

    source = tiny_models / tiny_factory.file_names(family)["transformer"]
    path = write_scaled_fp8(source, diffusion_models_root / f"{family}-scaled-fp8.safetensors")
    model, latent = load_and_sample(comfy_host, loader_inputs(family, "single", "default", model=path.name))
    assert torch.isfinite(latent).all()
    qkv = model.model.diffusion_model.layers[0].attention.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.scale_weight.dtype == torch.float32
    assert "scaled_fp8_op" in type(qkv).__qualname__ and isinstance(qkv, comfy.ops.manual_cast.Linear)
    file_scale = safetensors.torch.load_file(str(path))["layers.0.attention.qkv.scale_weight"]
    assert torch.equal(qkv.scale_weight, file_scale)

    comfy_model = comfy_load(path, model.model.model_config.unet_config, monkeypatch)
    ours, theirs = model.model.diffusion_model.state_dict(), comfy_model.model.diffusion_model.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(
        ours[k].dtype == theirs[k].dtype and torch.equal(ours[k].float(), theirs[k].float()) for k in ours
    )
    assert model.model.get_dtype() == comfy_model.model.get_dtype()
    assert torch.equal(predict(model), predict(comfy_model))
    reference, _ = load_and_sample(comfy_host, loader_inputs(family, "single", "fp32"))
    assert rel_err(predict(model), predict(reference)) <= TOLERANCE_VS_BF16[torch.float8_e4m3fn]


def broken_scaled_file(tiny_models, root, change):
    source = tiny_models / tiny_factory.file_names("lumina2")["transformer"]
    path = write_scaled_fp8(source, root / "lumina2-scaled-fp8.safetensors")
    tensors = safetensors.torch.load_file(str(path))
    change(tensors)
    broken = root / "lumina2-broken-scales.safetensors"
    safetensors.torch.save_file(tensors, str(broken))
    return broken


def assert_load_refused(comfy_host, inputs, *expected):
    with pytest.raises(PromptFailed) as info:
        load_and_sample(comfy_host, inputs)
    for text in expected:
        assert str(text) in str(info.value), f"{text!r} not in {info.value}"


def assert_refused_before_and_at_loading(comfy_host, path, *expected):
    """Refused when the prompt is queued (from the header), and by the loader itself (for scripts)."""
    from lumina_turbo.loading import model_files

    prompt, _ids = sampling_prompt(loader_inputs("lumina2", "single", "default", model=path.name))
    valid, _error, _outputs, node_errors = comfy_host.validate(prompt)
    assert not valid
    with pytest.raises(model_files.ModelFileError) as info:
        model_files.load_transformer_file(path)
    for message in (str(node_errors), str(info.value)):
        for text in (path, *expected):
            assert str(text) in message, f"{text!r} not in {message}"


def test_scaled_fp8_file_without_a_scale(comfy_host, tiny_models, diffusion_models_root):
    path = broken_scaled_file(
        tiny_models, diffusion_models_root, lambda t: t.pop("layers.1.feed_forward.w2.scale_weight")
    )
    assert_refused_before_and_at_loading(comfy_host, path, "scaled fp8",
                                         "'layers.1.feed_forward.w2.scale_weight' is missing")  # fmt: skip


def test_scaled_fp8_file_with_a_misshaped_scale(comfy_host, tiny_models, diffusion_models_root):
    def per_row(tensors):
        rows = tensors["layers.0.attention.out.weight"].shape[0]
        tensors["layers.0.attention.out.scale_weight"] = torch.ones(rows)

    path = broken_scaled_file(tiny_models, diffusion_models_root, per_row)
    assert_refused_before_and_at_loading(comfy_host, path, "'layers.0.attention.out.scale_weight' has shape",
                                         "expected one float per layer")  # fmt: skip


# ---------------------------------------------------------------- fp8 where ComfyUI cannot store it


@pytest.fixture
def no_fp8_storage(comfy_host, monkeypatch):
    """A load device like Apple's MPS or DirectML: ComfyUI's ``supports_cast`` says no to fp8."""
    import comfy.model_management as mm

    supports_cast = mm.supports_cast
    monkeypatch.setattr(
        mm, "supports_cast", lambda device, dtype: "float8" not in str(dtype) and supports_cast(device, dtype)
    )


def test_fp8_choice_refused_before_queueing_where_fp8_cannot_be_stored(comfy_host, no_fp8_storage):
    prompt, _ids = sampling_prompt(loader_inputs("zimage", "folder", "fp8_e5m2"))
    valid, error, _outputs, node_errors = comfy_host.validate(prompt)
    assert not valid
    message = str(node_errors)
    assert "weight_dtype" in message and "fp8_e5m2" in message and "choose bf16 or fp16" in message


def test_fp8_file_refused_where_fp8_cannot_be_stored(
    comfy_host, tiny_models, diffusion_models_root, no_fp8_storage
):
    source = tiny_models / tiny_factory.file_names("lumina2")["transformer"]
    path = write_scaled_fp8(source, diffusion_models_root / "lumina2-scaled-fp8.safetensors")
    assert_load_refused(comfy_host, loader_inputs("lumina2", "single", "default", model=path.name),
                        path, "cannot store torch.float8_e4m3fn weights")  # fmt: skip


# ---------------------------------------------------------------- text encoders: as ComfyUI loads them


@pytest.fixture
def text_encoders_root(tmp_path, comfy_host):
    import folder_paths

    root = tmp_path / "text_encoders"
    root.mkdir()
    folder_paths.add_model_folder_path("text_encoders", str(root))
    yield root
    folder_paths.folder_names_and_paths["text_encoders"][0].remove(str(root))


def fp8_text_encoder(tiny_models, root, family):
    """Every floating tensor of the tiny text encoder stored in fp8 e4m3fn, no scales."""
    tensors = safetensors.torch.load_file(str(tiny_models / tiny_factory.file_names(family)["text_encoder"]))
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in tensors.items()}
    path = root / f"{family}-te-fp8.safetensors"
    safetensors.torch.save_file(fp8, str(path))
    return path


@pytest.mark.parametrize("kind", ["scaled_fp8", "fp8"])
@pytest.mark.parametrize("family", tiny_factory.FAMILIES)
def test_fp8_text_encoder_files(comfy_host, tiny_models, text_encoders_root, family, kind):
    """Scaled-fp8 text encoders (both families) and fp8 Qwen3 load as ComfyUI loads them: fp8 projections,
    conditioning near the fp32 encoder's (max-abs error / max |cond| <= 0.2). A Gemma-2 with fp8 norms,
    which ComfyUI's Gemma-2 cannot run, is refused naming the file and the tensor."""
    source = tiny_models / tiny_factory.file_names(family)["text_encoder"]
    if kind == "scaled_fp8":
        path = write_scaled_fp8_text_encoder(source, text_encoders_root / f"{family}-te-scaled.safetensors")
    else:
        path = fp8_text_encoder(tiny_models, text_encoders_root, family)
    inputs = {**loader_inputs(family, "single", "default"), "text_encoder": path.name}
    if family == "lumina2" and kind == "fp8":
        assert_load_refused(comfy_host, inputs, path, "Gemma-2 norm weights in bf16, fp16 or fp32",
                            "model.layers.0.input_layernorm.weight is torch.float8_e4m3fn")  # fmt: skip
        return
    _, _, reference, _ = load_and_sample(
        comfy_host, loader_inputs(family, "single", "default"), with_cond=True
    )
    _, latent, cond, clip = load_and_sample(comfy_host, inputs, with_cond=True)
    assert torch.isfinite(latent).all() and cond.shape == reference.shape
    assert rel_err(cond, reference) <= 0.2
    weights = clip.cond_stage_model.state_dict()
    (q_proj,) = [k for k in weights if k.endswith("layers.0.self_attn.q_proj.weight")]
    assert weights[q_proj].dtype == torch.float8_e4m3fn
    assert (q_proj[: -len("weight")] + "scale_weight" in weights) == (kind == "scaled_fp8")
