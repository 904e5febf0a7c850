"""LoRA training on an fp8 base: LTModelLoader's fp8 weight_dtype and the stock UNETLoader's fp8 MODEL.

* The gradients through ComfyUI's cast fp8 weights are right: training on the fp8 base gives the
  run on a fp32 model holding the same (fp8-rounded) weights (losses and LoRA to 1e-5 relative);
  block swapping and gradient checkpointing on top give identical runs.
* A training step keeps no compute-dtype copy of the frozen fp8 weights for backward (plain and
  scaled fp8): the clone re-casts them there.
* Through the real executor: LTModelLoader(fp8_e4m3fn) -> LTDataset -> LTLoraTrainer -> LTSaveLora;
  the LoRA (fp32, the same keys) loads on the bf16 model with the stock LoraLoader and no warning,
  and its held-out loss (other images of the concept, fixed noise, the 8 anchor sigmas) is within
  5 % of the same run's on a bf16 base. The stock UNETLoader's fp8 MODEL trains the same LoRA.
* Layers that multiply in fp8 (_fast, scaled-fp8 files where the GPU can) train through the cast.
* The CLI's ``[model] weight_dtype`` takes the fp8 choices and trains on that base.
"""

import logging
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from lumina_turbo.devtools.example_dataset import write_concept_dataset
from lumina_turbo.devtools.harness import graph
from lumina_turbo.devtools.prompts import empty_latent, ksampler, save_latent, trainer_inputs
from lumina_turbo.devtools.training_support import build, one_thread, small_config, tiny_family  # noqa: F401
from lumina_turbo.training import engine

MODEL, TE, VAE = (
    "tiny-random-lumina2.safetensors",
    "tiny-random-gemma2.safetensors",
    "tiny-random-flux-vae.safetensors",
)
HELD_OUT_TOLERANCE = 0.05


def fp8_base(weight_dtype="fp8_e4m3fn"):
    from lumina_turbo.devtools.harness import MODELS_DIR
    from lumina_turbo.loading import model_files

    options = model_files.weight_dtype_options(weight_dtype)
    return model_files.load_transformer_file(MODELS_DIR / "diffusion_models" / MODEL, **options)


def fp32_twin(model):
    """A fp32 model holding ``model``'s stored weights exactly (fp8 values are representable in fp32)."""
    from lumina_turbo.loading import nextdit_build

    config = {k: v for k, v in model.model.model_config.unet_config.items() if k != "dtype"}
    weights = {k: t.float() for k, t in model.model.diffusion_model.state_dict().items()}
    return nextdit_build.build_nextdit(weights, config, dtype=torch.float32)


@pytest.fixture(scope="module")
def concept(tmp_path_factory, tiny_models):
    tiny_family("lumina2")
    root = tmp_path_factory.mktemp("fp8-concept")
    return build(write_concept_dataset(root / "data", count=3))


def assert_same_run(a, b, rel=1e-5):
    torch.testing.assert_close(torch.tensor(a.loss_history), torch.tensor(b.loss_history), rtol=rel, atol=0)
    for key in a.lora:
        torch.testing.assert_close(a.lora[key], b.lora[key], rtol=rel, atol=1e-7)


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e5m2"])
def test_gradients_through_fp8_weights_are_those_of_the_rounded_model(concept, weight_dtype):
    base = fp8_base(weight_dtype)
    assert {t.dtype for t in base.model.diffusion_model.state_dict().values()} == {
        {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[weight_dtype]
    }
    config = small_config(max_train_steps=3, learning_rate=5e-3, batch_size=2)
    on_fp8 = engine.LoraTrainer(config, base, concept).run()
    assert all(v.dtype == torch.float32 for v in on_fp8.lora.values())
    assert any(float(v.abs().max()) > 0 for k, v in on_fp8.lora.items() if "lora_up" in k)
    assert_same_run(on_fp8, engine.LoraTrainer(config, fp32_twin(base), concept).run())


def test_block_swapping_and_checkpointing_on_an_fp8_base(concept):
    base = fp8_base()
    config = small_config(max_train_steps=2, batch_size=2)
    plain = engine.LoraTrainer(config, base, concept).run()
    checkpointed = config.replace(gradient_checkpointing=True)
    assert_same_run(plain, engine.LoraTrainer(checkpointed, base, concept).run())
    swapped = engine.LoraTrainer(checkpointed.replace(blocks_to_swap=1), base, concept).run()
    assert_same_run(plain, swapped)


@pytest.mark.parametrize("kind", ["fp8_e4m3fn", "scaled_fp8"])
def test_a_training_step_saves_no_cast_copy_of_the_frozen_weights(concept, tmp_path, kind):
    """Autograd needs W for grad_x = grad_out @ W; the training clone casts the fp8 weight again in
    backward rather than keeping each layer's compute-dtype copy (with checkpointing, a whole block's
    weights in fp32 or bf16 at once: about half the memory fp8 storage saves). Counted without
    checkpointing, so every tensor autograd saves passes the hook."""
    from lumina_turbo.devtools.harness import MODELS_DIR
    from lumina_turbo.devtools.scaled_fp8 import write_scaled_fp8
    from lumina_turbo.loading import model_files

    if kind == "scaled_fp8":
        path = write_scaled_fp8(MODELS_DIR / "diffusion_models" / MODEL, tmp_path / "scaled.safetensors")
        base = model_files.load_transformer_file(path)
    else:
        base = fp8_base(kind)
    linears = [m for m in base.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
    assert {m.weight.dtype for m in linears} == {torch.float8_e4m3fn}
    by_shape = {}
    for module in linears:
        scale = getattr(module, "scale_weight", None)
        forms = [module.weight.float()] + (
            [module.weight.float() * scale.float()] if scale is not None else []
        )
        by_shape.setdefault(tuple(module.weight.shape), []).extend(forms)

    copies, saved_bytes = [], 0

    def pack(tensor):
        nonlocal saved_bytes
        saved_bytes += tensor.numel() * tensor.element_size()
        for candidate in [tensor, tensor.t()] if tensor.dim() == 2 else [tensor]:  # F.linear saves W.t()
            if any(torch.equal(candidate, form) for form in by_shape.get(tuple(candidate.shape), [])):
                copies.append(tuple(candidate.shape))
        return tensor

    config = small_config(max_train_steps=1, batch_size=2)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = engine.LoraTrainer(config, base, concept).run()
    assert result.steps == 1 and saved_bytes > 0
    assert copies == []  # before the re-cast: one fp32 copy per Linear layer and forward pass


# ---------------------------------------------------------------- through the executor


@pytest.fixture
def loras_subfolder():
    import folder_paths

    name = f"lt_fp8_{uuid.uuid4().hex[:8]}"
    yield name
    shutil.rmtree(Path(folder_paths.get_folder_paths("loras")[0]) / name, ignore_errors=True)


def training_prompt(model_node, folder, run_name, lora_prefix, steps=16):
    """``model_node(g)`` gives the MODEL to train; the rest of the graph is LTDataset -> LTLoraTrainer -> LTSaveLora."""
    g = graph()
    load = g.node("LTModelLoader", model=MODEL, text_encoder=TE, vae=VAE, weight_dtype="bf16")
    dataset = g.node(
        "LTDataset", folder=str(folder), vae=load.out(2), clip=load.out(1), resolution=64, bucket_step=64,
        enable_bucket=True, caption_dropout=0.0, system_prompt="none", num_repeats=1, max_sequence_length=512,
    )  # fmt: skip
    trainer = g.node(
        "LTLoraTrainer", model=model_node(g), dataset=dataset.out(0), run_name=run_name,
        **trainer_inputs(steps=steps, learning_rate=3e-3, rank=8, alpha=8.0, seed=0, jitter_scale=0.0,
                         gradient_checkpointing=True, blocks_to_swap=1, checkpoint_every=0, resume=False),
    )  # fmt: skip
    g.node("LTSaveLora", lora=trainer.out(1), filename_prefix=f"{lora_prefix}/{run_name}", save_dtype="fp32",
           format="comfyui")  # fmt: skip
    return g.finalize(), trainer.id


def lt_loader(weight_dtype):
    return lambda g: g.node(
        "LTModelLoader", model=MODEL, text_encoder=TE, vae=VAE, weight_dtype=weight_dtype
    ).out(0)


def train(comfy_host, model_node, folder, lora_prefix):
    import folder_paths

    run_name = f"fp8-{uuid.uuid4().hex[:8]}"
    prompt, trainer_id = training_prompt(model_node, folder, run_name, lora_prefix)
    comfy_host.run(prompt)
    lora = comfy_host.executor.caches.outputs.get(trainer_id).outputs[1][0]
    shutil.rmtree(
        Path(folder_paths.get_output_directory()) / "lumina_turbo_training" / run_name, ignore_errors=True
    )
    (saved,) = [
        n for n in folder_paths.get_filename_list("loras") if n.startswith(f"{lora_prefix}/{run_name}")
    ]
    return lora, saved


def held_out_loss(comfy_host, lora_name, held_out, caplog):
    """The saved LoRA on the bf16 model through the stock LoraLoader; (held-out loss without it, with it,
    "lora key not loaded" warnings)."""
    from lumina_turbo.devtools import evaluate
    from lumina_turbo.samplers.schedules import anchor_sigmas

    g = graph()
    load = g.node("LTModelLoader", model=MODEL, text_encoder=TE, vae=VAE, weight_dtype="bf16")
    lora = g.node("LoraLoader", model=load.out(0), clip=load.out(1), lora_name=lora_name, strength_model=1.0,
                  strength_clip=1.0)  # fmt: skip
    cond = g.node("CLIPTextEncode", text="a photo of ltconcept", clip=lora.out(1))
    latent = empty_latent(g, width=64, height=64)
    sampled = ksampler(g, lora.out(0), cond.out(0), cond.out(0), latent.out(0), seed=0, steps=1)
    save_latent(g, sampled.out(0), "fp8_lora")
    prompt = g.finalize()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        comfy_host.run(prompt)
    warnings = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    anchors = anchor_sigmas(8, 3.0)[:-1]
    losses = [
        evaluate.anchor_velocity_losses(
            comfy_host.executor.caches.outputs.get(node.id).outputs[0][0], held_out, anchors
        )
        for node in (load, lora)
    ]
    return losses[0].mean().item(), losses[1].mean().item(), warnings


def test_lora_trained_on_fp8_base_in_the_executor(comfy_host, tmp_path, loras_subfolder, caplog):
    folder = write_concept_dataset(tmp_path / "train", count=4, seed=0)
    held_out = build(write_concept_dataset(tmp_path / "held-out", count=3, seed=1), cache=tmp_path / "cache")
    results = {}
    for weight_dtype in ("bf16", "fp8_e4m3fn"):
        lora, saved = train(comfy_host, lt_loader(weight_dtype), folder, loras_subfolder)
        assert all(v.dtype == torch.float32 for v in lora.values())
        results[weight_dtype] = (lora, *held_out_loss(comfy_host, saved, held_out, caplog))
    assert sorted(results["bf16"][0]) == sorted(results["fp8_e4m3fn"][0])
    assert results["bf16"][3] == results["fp8_e4m3fn"][3] == []  # no "lora key not loaded"
    untrained, bf16_loss, fp8_loss = results["bf16"][1], results["bf16"][2], results["fp8_e4m3fn"][2]
    assert bf16_loss < 0.8 * untrained and fp8_loss < 0.8 * untrained, (untrained, bf16_loss, fp8_loss)
    assert abs(fp8_loss - bf16_loss) <= HELD_OUT_TOLERANCE * bf16_loss, (fp8_loss, bf16_loss)


def test_stock_unetloader_fp8_model_trains_like_ours(
    comfy_host, tmp_path, loras_subfolder, caplog, monkeypatch
):
    """UNETLoader(fp8_e4m3fn) gives the same fp8 weights as LTModelLoader(fp8_e4m3fn), so the same LoRA.

    ComfyUI detects NextDiT's head count and RoPE only at the released widths (2304, 3840), so its
    detection is told the tiny model's config; the rest of UNETLoader's load is ComfyUI's own."""
    import comfy.model_detection
    import safetensors.torch

    from lumina_turbo.devtools.harness import MODELS_DIR
    from lumina_turbo.loading import nextdit_config

    tensors = safetensors.torch.load_file(str(MODELS_DIR / "diffusion_models" / MODEL))
    config = nextdit_config.unet_config_from_state_dict(tensors)
    monkeypatch.setattr(comfy.model_detection, "detect_unet_config", lambda *args, **kwargs: dict(config))
    folder = write_concept_dataset(tmp_path / "train", count=4, seed=0)
    stock = lambda g: g.node("UNETLoader", unet_name=MODEL, weight_dtype="fp8_e4m3fn").out(0)  # noqa: E731
    from_stock, _ = train(comfy_host, stock, folder, loras_subfolder)
    from_ours, _ = train(comfy_host, lt_loader("fp8_e4m3fn"), folder, loras_subfolder)
    assert sorted(from_stock) == sorted(from_ours)
    assert all(torch.equal(from_stock[k], from_ours[k]) for k in from_ours)


@pytest.mark.parametrize("kind", ["fp8_e4m3fn_fast", "scaled_fp8"])
def test_fp8_matmul_layers_train_through_the_cast(concept, tmp_path, monkeypatch, kind):
    """Where the GPU multiplies in fp8 (Ada, Hopper; simulated here), ComfyUI picks its fp8 matmul layers
    for the _fast choice and for scaled-fp8 files; training runs them through the cast instead, so
    the run equals the one where fp8 multiplies are off."""
    import comfy.model_management as mm
    import comfy.ops

    from lumina_turbo.devtools.harness import MODELS_DIR
    from lumina_turbo.devtools.scaled_fp8 import write_scaled_fp8
    from lumina_turbo.loading import model_files

    scaled = write_scaled_fp8(MODELS_DIR / "diffusion_models" / MODEL, tmp_path / "scaled.safetensors")

    def load():
        return model_files.load_transformer_file(scaled) if kind == "scaled_fp8" else fp8_base(kind)

    config = small_config(max_train_steps=2, batch_size=2, gradient_checkpointing=True)
    reference = engine.LoraTrainer(config, load(), concept).run()
    monkeypatch.setattr(mm, "supports_fp8_compute", lambda device=None: True)
    model = load()
    qkv = model.model.diffusion_model.layers[0].attention.qkv
    if kind == "fp8_e4m3fn_fast":
        assert isinstance(qkv, comfy.ops.fp8_ops.Linear)
    else:
        x = torch.randn(1, 3, qkv.in_features, requires_grad=True)
        with pytest.raises(RuntimeError, match="automatic differentiation"):
            qkv(x)  # ComfyUI's fp8 matmul path, unpatched
    assert_same_run(reference, engine.LoraTrainer(config, model, concept).run())


def test_cli_model_weight_dtype_fp8(tmp_path, tiny_models):
    """[model] weight_dtype takes the loader's fp8 choices; the CLI's model then holds fp8 weights."""
    from lumina_turbo.training import cli
    from lumina_turbo.training import config as cfg

    tiny_family("lumina2")  # ComfyUI imported, its models/ folders known
    config = cfg.config_from_flat(
        {"transformer": MODEL, "text_encoder": TE, "vae": VAE, "weight_dtype": "fp8_e5m2"}, origin="test"
    )
    model, _clip, _vae = cli.load_models(config, tmp_path)
    assert {t.dtype for t in model.model.diffusion_model.state_dict().values()} == {torch.float8_e5m2}
    with pytest.raises(cfg.ConfigError, match="weight_dtype"):
        cfg.config_from_flat({"weight_dtype": "fp8_e4m3"}, origin="test")


def test_cli_trains_on_an_fp8_base(tiny_models, tmp_path):
    """``python -m lumina_turbo.train`` with ``[model] weight_dtype = "fp8_e4m3fn"``: the LoRA it writes is
    the engine's on the fp8 base (so the CLI and LTLoraTrainer train the same thing)."""
    import safetensors.torch
    from test_train_cli import TOML

    from lumina_turbo.training import config as cfg
    from lumina_turbo.training.cli import main
    from lumina_turbo.training.dataset import build_from_folder

    write_concept_dataset(tmp_path / "data", count=3)
    toml = TOML.replace('save_dtype = "fp32"', 'save_dtype = "fp32"\nweight_dtype = "fp8_e4m3fn"')
    (tmp_path / "t.toml").write_text(toml)
    assert main(["--config", str(tmp_path / "t.toml")]) == 0
    written = safetensors.torch.load_file(tmp_path / "out" / "cli_lora.safetensors")
    _, clip, vae = tiny_family("lumina2")
    data = build_from_folder(
        tmp_path / "data", vae=vae, clip=clip, cache_root=tmp_path / "cache", resolution=64
    )
    direct = engine.LoraTrainer(cfg.load_toml(tmp_path / "t.toml"), fp8_base(), data).run()
    assert written.keys() == direct.lora.keys()
    assert all(torch.equal(written[k], direct.lora[k]) for k in written)
