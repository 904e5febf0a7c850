"""The tiny-model factory: real diffusers folders and ComfyUI single files of both families."""

import json

import pytest
import torch

from lumina_turbo.devtools import tiny_factory
from lumina_turbo.devtools.comfy_host import bootstrap
from lumina_turbo.loading.safetensors_io import load_safetensors

FAMILIES = tiny_factory.FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_layout(tiny_models, family):
    folder = tiny_models / tiny_factory.file_names(family)["diffusers"]
    index = json.loads(
        (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text()
    )
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    assert not (folder / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    for part in ("text_encoder", "tokenizer", "vae", "scheduler"):
        assert (folder / part).is_dir(), part
    model_index = json.loads((folder / "model_index.json").read_text())
    assert model_index["_class_name"] == {"lumina2": "Lumina2Pipeline", "zimage": "ZImagePipeline"}[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_reloads_and_samples(tiny_models, family):
    """from_pretrained of the real pipeline class; two runs from one seed give the same finite latents."""
    from diffusers import Lumina2Pipeline, ZImagePipeline

    cls = {"lumina2": Lumina2Pipeline, "zimage": ZImagePipeline}[family]
    pipe = cls.from_pretrained(
        tiny_models / tiny_factory.file_names(family)["diffusers"], torch_dtype=torch.float32
    )
    kwargs = dict(
        prompt="a red cat",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="latent",
    )
    kwargs["max_sequence_length"] = 32
    runs = [pipe(generator=torch.Generator().manual_seed(7), **kwargs).images for _ in range(2)]
    assert torch.isfinite(runs[0]).all()
    assert runs[0].abs().mean() > 1e-3
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_factory_is_deterministic(family):
    """Every component of a family (transformer, text encoder, VAE, tokenizer) comes from the seed."""
    bootstrap()  # the Qwen tokenizer is the one ComfyUI ships
    first, first_spiece = tiny_factory.tiny_pipeline(family, seed=3)
    second, second_spiece = tiny_factory.tiny_pipeline(family, seed=3)
    other, _ = tiny_factory.tiny_pipeline(family, seed=4)
    assert first_spiece == second_spiece
    assert first.tokenizer("a red cat").input_ids == second.tokenizer("a red cat").input_ids
    for part in ("transformer", "text_encoder", "vae"):
        ours, again, changed = (getattr(p, part).state_dict() for p in (first, second, other))
        assert ours.keys() == again.keys()
        for name, tensor in ours.items():
            assert torch.equal(tensor, again[name]), f"{part}.{name}"
        assert any(not torch.equal(tensor, changed[name]) for name, tensor in ours.items()), part


def _safetensors_parts(path):
    """(tensor header, data bytes) of a .safetensors file; the metadata's key order is not kept by
    safetensors, and the VAE file is shared by both families (its metadata names the last one)."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    header.pop("__metadata__", None)
    return header, raw[8 + size :]


def test_written_files_are_identical(tiny_models, tmp_path):
    """Writing the factory's files again (another process wrote the installed ones) gives the same
    files: configs, tokenizer and shard index byte for byte, every tensor bit for bit."""
    bootstrap()
    paths = tiny_factory.write_family(tmp_path, "lumina2", seed=0)
    for part, path in paths.items():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        assert files, part
        for file in files:
            installed = tiny_models / file.relative_to(tmp_path)
            name = file.relative_to(tmp_path)
            if file.suffix == ".safetensors":
                assert _safetensors_parts(file) == _safetensors_parts(installed), f"{name} differs"
            else:
                assert file.read_bytes() == installed.read_bytes(), f"{name} differs"


@pytest.mark.parametrize("family", FAMILIES)
def test_single_files_load_into_comfy_classes(tiny_models, family):
    """The ComfyUI-style files build ComfyUI's own NextDiT / text encoder / VAE, with finite outputs."""
    bootstrap()
    import comfy.model_base

    from lumina_turbo.loading import model_files

    names = tiny_factory.file_names(family)
    model = model_files.load_transformer_file(tiny_models / names["transformer"])
    clip = model_files.load_text_encoder_file(tiny_models / names["text_encoder"])
    vae = model_files.load_vae_file(tiny_models / names["vae"])
    assert isinstance(model.model, comfy.model_base.Lumina2)
    assert type(model.model.model_config).__name__ == {"lumina2": "Lumina2", "zimage": "ZImage"}[family]

    cond = clip.encode_from_tokens(clip.tokenize("a red cat"))
    assert cond.shape[-1] == model.model.diffusion_model.cap_embedder[1].weight.shape[1]
    torch.manual_seed(0)
    x = torch.randn(1, 16, 8, 8)
    out = model.model.apply_model(x, torch.tensor([0.7]), c_crossattn=cond, num_tokens=cond.shape[1])
    image = vae.decode(torch.randn(1, 16, 8, 8))
    assert torch.isfinite(out).all() and out.std() > 1e-3
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


def test_single_file_metadata_marks_random_weights(tiny_models):
    from safetensors import safe_open

    path = tiny_models / tiny_factory.file_names("zimage")["transformer"]
    with safe_open(str(path), framework="pt") as f:
        assert "not trained" in f.metadata()["lumina_turbo"]
    assert path.name.startswith("tiny-random-")
    assert load_safetensors(path)
