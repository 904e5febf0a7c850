"""The tiny-model factory: real diffusers folders and ComfyUI single files of both families."""

import json

import pytest
import torch
from comfy_host import bootstrap

from lumina_turbo.models import tiny_factory
from lumina_turbo.models.safetensors_io import load_safetensors

FAMILIES = tiny_factory.FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_layout(tiny_models, family):
    folder = tiny_models / tiny_factory.file_names(family)["diffusers"]
    index = json.loads((folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
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
    pipe = cls.from_pretrained(tiny_models / tiny_factory.file_names(family)["diffusers"], torch_dtype=torch.float32)
    kwargs = dict(prompt="a red cat", height=64, width=64, num_inference_steps=2, guidance_scale=3.0,
                  output_type="latent")
    kwargs["max_sequence_length"] = 32
    runs = [pipe(generator=torch.Generator().manual_seed(7), **kwargs).images for _ in range(2)]
    assert torch.isfinite(runs[0]).all()
    assert runs[0].abs().mean() > 1e-3
    assert torch.equal(runs[0], runs[1])


def test_factory_is_deterministic():
    first, _ = tiny_factory.tiny_pipeline("lumina2", seed=3)
    second, _ = tiny_factory.tiny_pipeline("lumina2", seed=3)
    other, _ = tiny_factory.tiny_pipeline("lumina2", seed=4)
    for name, tensor in first.transformer.state_dict().items():
        assert torch.equal(tensor, second.transformer.state_dict()[name]), name
    assert not torch.equal(first.vae.state_dict()["decoder.conv_in.weight"], other.vae.state_dict()["decoder.conv_in.weight"])


@pytest.mark.parametrize("family", FAMILIES)
def test_single_files_load_into_comfy_classes(tiny_models, family):
    """The ComfyUI-style files build ComfyUI's own NextDiT / text encoder / VAE, with finite outputs."""
    bootstrap()
    import comfy.model_base

    from lumina_turbo.models import loading

    names = tiny_factory.file_names(family)
    model = loading.load_transformer_file(tiny_models / names["transformer"])
    clip = loading.load_text_encoder_file(tiny_models / names["text_encoder"])
    vae = loading.load_vae_file(tiny_models / names["vae"])
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
