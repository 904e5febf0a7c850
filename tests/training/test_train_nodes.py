"""LTDataset -> LTLoraTrainer -> LTSaveLora through ComfyUI's real executor; the saved file through the
stock LoraLoader (zero "lora key not loaded" warnings, same pictures as the trained MODEL output);
live progress events; the dataset cache reused by a second run; bad inputs refused before running."""

import json
import logging
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lumina_turbo.devtools.example_dataset import solid_image, write_concept_dataset, write_image
from lumina_turbo.devtools.harness import REPO, graph
from lumina_turbo.devtools.prompts import decode_and_save, empty_latent, ksampler, tiny_loader, trainer_inputs
from lumina_turbo.devtools.training_support import one_thread  # noqa: F401 (autouse: one torch thread)


def loader(g):
    return tiny_loader(g, "lumina2", "single")


def sample_and_save(g, model, clip, vae, prefix):
    pos = g.node("CLIPTextEncode", text="a photo of ltconcept", clip=clip)  # the captions' own encoding
    sampled = ksampler(g, model, pos.out(0), pos.out(0), empty_latent(g, 64, 64).out(0), seed=3)
    decode_and_save(g, sampled.out(0), vae, prefix)


def training_prompt(folder, run_name, lora_prefix):
    g = graph()
    load = loader(g)
    dataset = g.node(
        "LTDataset",
        folder=str(folder),
        vae=load.out(2),
        clip=load.out(1),
        resolution=64,
        bucket_step=64,
        enable_bucket=True,
        caption_dropout=0.0,
        system_prompt="none",
        num_repeats=1,
        max_sequence_length=512,
    )
    trainer = g.node(
        "LTLoraTrainer", model=load.out(0), dataset=dataset.out(0), run_name=run_name, **trainer_inputs()
    )
    g.node(
        "LTSaveLora",
        lora=trainer.out(1),
        filename_prefix=f"{lora_prefix}/native",
        save_dtype="fp32",
        format="comfyui",
    )
    g.node(
        "LTSaveLora",
        lora=trainer.out(1),
        filename_prefix=f"{lora_prefix}/kohya",
        save_dtype="fp32",
        format="kohya",
    )
    sample_and_save(g, trainer.out(0), load.out(1), load.out(2), f"{lora_prefix}_trained")
    sample_and_save(g, load.out(0), load.out(1), load.out(2), f"{lora_prefix}_base")
    return g.finalize(), dataset.id, trainer.id


def stock_lora_prompt(lora_name, prefix):
    g = graph()
    load = loader(g)
    lora = g.node(
        "LoraLoader",
        model=load.out(0),
        clip=load.out(1),
        lora_name=lora_name,
        strength_model=1.0,
        strength_clip=1.0,
    )
    sample_and_save(g, lora.out(0), lora.out(1), load.out(2), prefix)
    return g.finalize()


def pixels(comfy_host, outputs, prefix):
    (path,) = [p for p in comfy_host.image_paths(outputs) if p.name.startswith(prefix)]
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture
def loras_subfolder():
    import folder_paths

    name = f"lt_test_{uuid.uuid4().hex[:8]}"
    yield name
    shutil.rmtree(Path(folder_paths.get_folder_paths("loras")[0]) / name, ignore_errors=True)


def test_train_save_and_load_with_stock_loraloader(comfy_host, tmp_path, loras_subfolder, caplog):
    import folder_paths

    # images of their own (seed): other tests of the session share ComfyUI's output cache folder
    folder = write_concept_dataset(tmp_path / "concept", count=3, seed=31)
    run_name = f"lt-test-{uuid.uuid4().hex[:8]}"
    prompt, dataset_id, trainer_id = training_prompt(folder, run_name, loras_subfolder)
    outputs = comfy_host.run(prompt)
    assert "3 encoded, 0 from cache" in outputs[dataset_id]["text"][0]
    events = [data for event, data in comfy_host.server.messages if event == "lumina_turbo.train_progress"]
    assert [e["step"] for e in events] == [1, 2, 3]
    assert all(
        e["node"] == trainer_id and e["total"] == 3 and np.isfinite(e["loss"]) and e["lr"] == 5e-3
        for e in events
    )
    trained = pixels(comfy_host, outputs, f"{loras_subfolder}_trained")
    base = pixels(comfy_host, outputs, f"{loras_subfolder}_base")
    assert np.abs(trained - base).max() > 0, "three steps at lr 5e-3 must change the picture"

    loras = folder_paths.get_filename_list("loras")
    native = [n for n in loras if n.startswith(f"{loras_subfolder}/native")]
    kohya = [n for n in loras if n.startswith(f"{loras_subfolder}/kohya")]
    assert len(native) == 1 and len(kohya) == 1, loras
    for name in native + kohya:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            reloaded = comfy_host.run(stock_lora_prompt(name, f"{loras_subfolder}_stock"))
        assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
        np.testing.assert_array_equal(pixels(comfy_host, reloaded, f"{loras_subfolder}_stock"), trained)

    from safetensors import safe_open

    with safe_open(folder_paths.get_full_path("loras", native[0]), framework="pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
    assert metadata["lumina_turbo.steps"] == "3" and metadata["ss_network_dim"] == "4"
    assert "diffusion_model.layers.0.attention.qkv.lora_up.weight" in keys
    assert "diffusion_model.layers.0.attention.qkv.alpha" in keys

    # A second run (fresh executor caches): the dataset comes from the disk cache, the run resumes at its end.
    comfy_host.executor.reset()
    prompt, dataset_id, trainer_id = training_prompt(folder, run_name, loras_subfolder)
    again = comfy_host.run(prompt)
    assert "0 encoded, 3 from cache" in again[dataset_id]["text"][0]
    assert "captions: 0 encoded" in again[dataset_id]["text"][0]
    assert "resumed at 3" in again[trainer_id]["text"][0]
    np.testing.assert_array_equal(pixels(comfy_host, again, f"{loras_subfolder}_trained"), trained)
    shutil.rmtree(Path(folder_paths.get_output_directory()) / "lumina_turbo_training" / run_name)


def _validation_error(comfy_host, prompt):
    # other output branches of the prompt stay valid, so look at the node errors, not the overall verdict
    _, _, _, node_errors = comfy_host.validate(prompt)
    assert node_errors
    return json.dumps(node_errors)


def test_bad_inputs_are_refused_before_running(comfy_host, tmp_path):
    prompt, dataset_id, trainer_id = training_prompt(tmp_path / "missing", "run", "x")
    assert "does not exist" in _validation_error(comfy_host, prompt)

    write_image(tmp_path / "uncaptioned", "a", solid_image((1, 0, 0)), "red")
    solid_image((0, 1, 0)).save(tmp_path / "uncaptioned" / "b.png")
    prompt[dataset_id]["inputs"]["folder"] = str(tmp_path / "uncaptioned")
    assert "no caption file" in _validation_error(comfy_host, prompt)

    write_concept_dataset(tmp_path / "ok", count=1)
    prompt[dataset_id]["inputs"]["folder"] = str(tmp_path / "ok")
    prompt[trainer_id]["inputs"]["advanced"] = "lambda_l1 = 0.5\nlearnig_rate = 1\n"
    assert "learnig_rate" in _validation_error(comfy_host, prompt)
    prompt[trainer_id]["inputs"]["advanced"] = ""
    prompt[trainer_id]["inputs"]["run_name"] = "../escape"
    assert "run_name" in _validation_error(comfy_host, prompt)
    prompt[trainer_id]["inputs"]["run_name"] = "ok"
    prompt[trainer_id]["inputs"]["blocks_to_swap"] = 2
    assert "needs gradient_checkpointing" in _validation_error(comfy_host, prompt)
    prompt[trainer_id]["inputs"]["blocks_to_swap"] = 0
    prompt[trainer_id]["inputs"]["optimizer"] = "SGD"
    assert "optimizer" in _validation_error(comfy_host, prompt)


def test_adamw8bit_failure_is_a_clear_error(comfy_host, tmp_path):
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    folder = write_concept_dataset(tmp_path / "concept", count=1)
    prompt, _, trainer_id = training_prompt(folder, f"lt-test-{uuid.uuid4().hex[:8]}", "unused")
    prompt[trainer_id]["inputs"]["optimizer"] = "AdamW8bit"
    # refused when queued, before the data set is encoded
    assert "AdamW8bit needs the bitsandbytes package" in _validation_error(comfy_host, prompt)
    # and where a script skips validation, the run stops with the same message
    from lumina_turbo.training import optim

    with pytest.raises(optim.OptimizerUnavailable, match="AdamW8bit needs a working bitsandbytes"):
        optim.make_optimizer("AdamW8bit", [torch.zeros(1, requires_grad=True)], lr=1e-4, weight_decay=0.0)


def test_example_workflow_validates(comfy_host):
    import folder_paths

    from lumina_turbo.devtools.example_dataset import install_example

    install_example(folder_paths.get_input_directory())
    prompt = json.loads((REPO / "example_workflows" / "api" / "lora_training.json").read_text())
    valid, error, _, node_errors = comfy_host.validate(prompt)
    assert valid, (error, node_errors)
