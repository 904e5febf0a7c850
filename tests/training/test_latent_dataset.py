"""Training data from latents (a LATENT batch + captions, or a latents file on the command line): the same
dataset, cache and training as the images they were encoded from; bad latents or caption counts refused
with the input named; VAEEncode -> LTDataset -> LTLoraTrainer through the real executor."""

import shutil
import uuid
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lumina_turbo.devtools.example_dataset import CONCEPT_CAPTION, write_concept_dataset
from lumina_turbo.devtools.harness import PromptFailed, graph
from lumina_turbo.devtools.prompts import trainer_inputs
from lumina_turbo.devtools.training_support import build, one_thread, small_config, tiny_family  # noqa: F401
from lumina_turbo.training.data_files import DatasetError
from lumina_turbo.training.engine import LoraTrainer
from lumina_turbo.training.latent_dataset import (
    latent_dataset,
    load_latents_file,
    parse_captions,
    split_latents,
)


def test_latents_train_exactly_like_the_images_they_came_from(tiny_models, tmp_path):
    folder = write_concept_dataset(tmp_path / "data", count=3)
    images = build(folder)
    model, clip, _ = tiny_family("lumina2")
    batch = {"samples": torch.stack([images.latent(i) for i in range(len(images))])}
    latents = latent_dataset(batch, CONCEPT_CAPTION, clip=clip, cache_root=tmp_path / "cache")
    assert latents.stats["latents_encoded"] == 3 and latents.stats["texts_encoded"] == 0  # captions shared
    assert [i.size for i in latents.items] == [i.size for i in images.items] == [(64, 64)] * 3
    for index in range(3):
        assert torch.equal(latents.latent(index), images.latent(index))
        assert latents.items[index].text_file == images.items[index].text_file
    again = latent_dataset(batch, [CONCEPT_CAPTION] * 3, clip=clip, cache_root=tmp_path / "cache")
    assert again.stats["latents_encoded"] == 0 and again.key == latents.key

    config = small_config(max_train_steps=3, batch_size=2)
    from_images = LoraTrainer(config, model, images).run().lora
    from_latents = LoraTrainer(config, model, latents).run().lora
    assert from_images.keys() == from_latents.keys()
    assert all(torch.equal(from_images[k], from_latents[k]) for k in from_images)


def test_latent_sizes_are_buckets(tiny_models, tmp_path):
    _, clip, _ = tiny_family("lumina2")
    parts = [torch.randn(2, 16, 8, 8), torch.randn(1, 16, 8, 12)]
    data = latent_dataset(parts, "a\nb\nc", clip=clip, cache_root=tmp_path)
    assert [i.size for i in data.items] == [(64, 64), (64, 64), (96, 64)]
    assert [i.caption for i in data.items] == ["a", "b", "c"]
    batches = data.epoch_batches(0, batch_size=2, seed=1)
    assert all(len({data.items[i].size for i in b}) == 1 for b in batches)


def test_bad_latents_and_captions_name_the_input():
    with pytest.raises(DatasetError, match="captions: 2 captions for 3 latents"):
        parse_captions("a\nb", 3)
    assert parse_captions("one for all\n\n", 2) == ["one for all"] * 2
    with pytest.raises(DatasetError, match=r"captions: 0 captions"):
        parse_captions("  ", 2)
    with pytest.raises(DatasetError, match=r"latents: expected image latents .*\(1, 16, 2, 8, 8\)"):
        split_latents({"samples": torch.zeros(1, 16, 2, 8, 8)})
    with pytest.raises(DatasetError, match="latents: holds NaN"):
        split_latents({"samples": torch.full((1, 16, 8, 8), float("nan"))})
    with pytest.raises(DatasetError, match="latents: expected a LATENT"):
        split_latents({"images": torch.zeros(1, 16, 8, 8)})


def test_latents_file_and_its_captions(tmp_path):
    path = tmp_path / "set.latent"
    safetensors.torch.save_file(
        {"latent_tensor": torch.randn(2, 16, 8, 8), "latent_format_version_0": torch.tensor([])}, str(path)
    )  # the layout of ComfyUI's SaveLatent
    with pytest.raises(DatasetError, match="no caption file"):
        load_latents_file(path)
    path.with_suffix(".txt").write_text("first\nsecond\n")
    data = load_latents_file(path)
    assert len(data) == 2 and data.captions == ["first", "second"]
    path.with_suffix(".txt").write_text("1\n2\n3\n")
    with pytest.raises(DatasetError, match="set.txt: 3 captions for 2 latents"):
        load_latents_file(path)


def test_cli_trains_on_a_latents_file(tiny_models, tmp_path, capsys):
    from lumina_turbo.training.cli import main

    _, _, vae = tiny_family("lumina2")
    images = build(write_concept_dataset(tmp_path / "data", count=2))
    stacked = torch.stack([images.latent(i) for i in range(2)])
    safetensors.torch.save_file({"latents": stacked}, str(tmp_path / "set.safetensors"))
    (tmp_path / "set.txt").write_text(CONCEPT_CAPTION)
    (tmp_path / "t.toml").write_text(
        '[model]\ntransformer = "tiny-random-lumina2.safetensors"\n'
        'text_encoder = "tiny-random-gemma2.safetensors"\noutput_dir = "out"\noutput_name = "from_latents"\n'
        '[training]\nmax_train_steps = 2\nmixed_precision = "fp32"\ncheckpoint_dir = "ckpt"\n'
        '[lora]\nnetwork_dim = 4\n[dataset]\nlatents = "set.safetensors"\ncache_dir = "cache"\n'
    )
    assert main(["--config", str(tmp_path / "t.toml"), "--check"]) == 0
    assert "2 captioned latents" in capsys.readouterr().out
    assert main(["--config", str(tmp_path / "t.toml")]) == 0
    out = capsys.readouterr().out
    assert "latents 2 encoded" in out and "captions 0 encoded" in out  # the images' text cache is reused
    assert (tmp_path / "out" / "from_latents.safetensors").is_file()


def test_vae_encode_to_dataset_to_trainer(comfy_host, tmp_path):
    import folder_paths

    run_name = f"lt-test-{uuid.uuid4().hex[:8]}"
    g = graph()
    load = g.node(
        "LTModelLoader",
        model="tiny-random-lumina2.safetensors",
        text_encoder="tiny-random-gemma2.safetensors",
        vae="tiny-random-flux-vae.safetensors",
        weight_dtype="default",
    )
    image = g.node("EmptyImage", width=64, height=64, batch_size=2, color=0xD01818)
    encoded = g.node("VAEEncode", pixels=image.out(0), vae=load.out(2))
    common = dict(
        resolution=64,
        bucket_step=64,
        enable_bucket=True,
        caption_dropout=0.0,
        system_prompt="none",
        num_repeats=1,
        max_sequence_length=512,
    )
    dataset = g.node(
        "LTDataset", folder="", clip=load.out(1), latents=encoded.out(0), captions="a red square", **common
    )
    trainer = g.node(
        "LTLoraTrainer",
        model=load.out(0),
        dataset=dataset.out(0),
        run_name=run_name,
        **trainer_inputs(steps=2, learning_rate=1e-3, checkpoint_every=0, resume=False),
    )
    prefix = f"lt_test_{uuid.uuid4().hex[:8]}"
    g.node(
        "LTSaveLora",
        lora=trainer.out(1),
        filename_prefix=f"{prefix}/lora",
        save_dtype="fp32",
        format="comfyui",
    )
    try:
        prompt = g.finalize()
        outputs = comfy_host.run(prompt)
        prompt[dataset.id]["inputs"].pop("latents")  # an empty folder and no latents: a clear error
        with pytest.raises(PromptFailed, match="or connect latents"):
            comfy_host.run(prompt)
    finally:
        shutil.rmtree(Path(folder_paths.get_folder_paths("loras")[0]) / prefix, ignore_errors=True)
        shutil.rmtree(
            Path(folder_paths.get_output_directory()) / "lumina_turbo_training" / run_name, ignore_errors=True
        )
    assert (
        "2 images" in outputs[dataset.id]["text"][0]
        and "buckets [(64, 64)]" in outputs[dataset.id]["text"][0]
    )
    assert "2 steps" in outputs[trainer.id]["text"][0]
