"""LTDataset's cache: reused across runs, re-encoding exactly what changed (image, caption, resolution,
VAE, text encoder), corrupt entries re-encoded, batches within one bucket in a seed/epoch order; the
node re-runs when the folder changes."""

import copy
import os

import pytest
import torch

from lumina_turbo.devtools.example_dataset import solid_image, write_concept_dataset, write_image
from lumina_turbo.devtools.harness import graph
from lumina_turbo.devtools.training_support import build, one_thread, tiny_family  # noqa: F401 (autouse: one torch thread)


@pytest.fixture(scope="module")
def families(tiny_models):
    return tiny_family("lumina2"), tiny_family("zimage")


def encoded(data):
    s = data.stats
    return s["latents_encoded"], s["texts_encoded"]


def test_second_build_encodes_nothing_and_changes_encode_only_themselves(families, tmp_path):
    folder = write_concept_dataset(tmp_path / "data", count=3)
    first = build(folder)
    assert encoded(first) == (3, 2)  # 3 latents, one shared caption + the empty caption
    again = build(folder)
    assert encoded(again) == (0, 0) and again.key == first.key
    for a, b in zip(first.items, again.items, strict=True):
        assert a.latent_file == b.latent_file
    assert torch.equal(first.latent(0), again.latent(0))
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]

    write_image(folder, "concept_01", solid_image((0.2, 0.9, 0.2)), "a photo of ltconcept")  # new pixels
    assert encoded(build(folder)) == (1, 0)
    (folder / "concept_02.txt").write_text("a photo of something else")  # new caption
    changed = build(folder)
    assert encoded(changed) == (0, 1) and changed.key != first.key
    assert encoded(build(folder, resolution=128, bucket_step=64)) == (3, 0)  # other bucket size
    assert encoded(build(folder, caption_dropout_rate=0.5)) == (0, 0)  # training option, not an encoding


def test_other_models_get_their_own_entries(families, tmp_path):
    (_, _, vae), (_, zimage_clip, _) = families
    folder = write_concept_dataset(tmp_path / "data", count=2)
    build(folder)
    from lumina_turbo.loading import model_files
    from lumina_turbo.training.dataset import build_from_folder

    other_vae = model_files.load_vae_file(_vae_file())
    with torch.no_grad():
        for tensor in other_vae.first_stage_model.state_dict().values():
            if tensor.is_floating_point():
                tensor.mul_(1.01)  # a different VAE (every value changes, as between real models)
    data = build_from_folder(
        folder, vae=other_vae, clip=families[0][1], cache_root=tmp_path / "cache", resolution=64
    )
    assert encoded(data) == (2, 0)
    data = build_from_folder(folder, vae=vae, clip=zimage_clip, cache_root=tmp_path / "cache", resolution=64)
    assert encoded(data) == (0, 2)


def _vae_file():
    from lumina_turbo.devtools.harness import MODELS_DIR

    return MODELS_DIR / "vae" / "tiny-random-flux-vae.safetensors"


def test_a_corrupt_entry_is_encoded_again(families, tmp_path):
    folder = write_concept_dataset(tmp_path / "data", count=2)
    data = build(folder)
    path = data.items[0].latent_file
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    assert encoded(build(folder)) == (1, 0)


def test_batches_stay_in_one_bucket_in_a_seeded_order(families, tmp_path):
    folder = tmp_path / "data"
    for i in range(3):
        write_image(folder, f"square_{i}", solid_image((1, 0, 0), size=(64, 64)), "a red square")
    for i in range(2):
        write_image(folder / "2_wide", f"wide_{i}", solid_image((0, 0, 1), size=(128, 64)), "a blue strip")
    data = build(folder, resolution=64, bucket_step=16)
    sizes = {item.size for item in data.items}
    assert len(sizes) == 2 and data.num_samples == 3 + 2 * 2
    assert all(
        data.latent(i).shape[-2:] == (h // 8, w // 8) for i, (w, h) in enumerate(i.size for i in data.items)
    )
    epoch0 = data.epoch_batches(0, batch_size=2, seed=1)
    assert len(epoch0) == data.batches_per_epoch(2) == 2 + 2  # ceil(3/2) + ceil(4/2)
    assert all(len({data.items[i].size for i in batch}) == 1 for batch in epoch0)
    assert sorted(i for batch in epoch0 for i in batch) == [0, 1, 2, 3, 3, 4, 4]
    assert data.epoch_batches(0, batch_size=2, seed=1) == epoch0
    assert any(data.epoch_batches(e, batch_size=2, seed=1) != epoch0 for e in (1, 2, 3))


def test_node_reruns_when_the_folder_changes(comfy_host, tmp_path):
    folder = write_concept_dataset(tmp_path / "data", count=2)
    g = graph()
    load = g.node(
        "LTModelLoader",
        model="tiny-random-lumina2.safetensors",
        text_encoder="tiny-random-gemma2.safetensors",
        vae="tiny-random-flux-vae.safetensors",
        weight_dtype="default",
    )
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
        cache_dir=str(tmp_path / "cache"),
    )
    g.node("PreviewAny", source=dataset.out(0))
    prompt = g.finalize()
    # a fresh copy per queue, like a new POST /prompt (the executor stores fingerprints in the prompt)
    assert "2 encoded" in comfy_host.run(copy.deepcopy(prompt))[dataset.id]["text"][0]
    (folder / "concept_01.txt").write_text("another caption")
    text = comfy_host.run(copy.deepcopy(prompt))[dataset.id]["text"][0]  # same widgets, the folder changed
    assert "latents: 0 encoded, 2 from cache; captions: 1 encoded" in text
