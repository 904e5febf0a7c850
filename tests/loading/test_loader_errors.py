"""Bad input to LTModelLoader, through ComfyUI's real executor: a clear message naming the file and
what was expected, refused before anything is loaded where the files allow it, and nothing written.

Broken folders are built in a temporary models/diffusers/ root (registered with
``folder_paths.add_model_folder_path``) from the tiny folders: unchanged files are symlinked,
changed ones copied first.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lumina_turbo.devtools import tiny_factory
from lumina_turbo.devtools.harness import PromptFailed, graph
from lumina_turbo.devtools.prompts import FROM_FOLDER, decode_and_save, empty_latent


@pytest.fixture(scope="module")
def roots(tmp_path_factory, comfy_host):
    """Temporary diffusers/ and diffusion_models/ roots, registered with ComfyUI for this module."""
    import folder_paths

    base = tmp_path_factory.mktemp("broken-models")
    added = {kind: base / kind for kind in ("diffusers", "diffusion_models", "text_encoders", "vae")}
    for kind, path in added.items():
        path.mkdir()
        folder_paths.add_model_folder_path(kind, str(path))
    yield added
    for kind, path in added.items():
        folder_paths.folder_names_and_paths[kind][0].remove(str(path))


def clone(tiny_models, family, dest, copy=()):
    """The tiny diffusers folder of ``family`` at ``dest``: symlinks, except real copies of ``copy``."""
    src = tiny_models / tiny_factory.file_names(family)["diffusers"]
    for path in sorted(src.rglob("*")):
        if path.is_file():
            target = dest / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            if str(path.relative_to(src)) in copy:
                shutil.copyfile(path, target)
            else:
                target.symlink_to(path)
    return dest


def file_name(family, part):
    """The tiny model's file name as the loader's combo offers it."""
    return tiny_factory.file_names(family)[part].split("/", 1)[1]


def shard(folder, number):
    return next((folder / "transformer").glob(f"diffusion_pytorch_model-0000{number}-of-*.safetensors"))


def snapshot(*roots):
    """Every file under ``roots`` with its size and modification time (to prove nothing was written)."""
    state = {}
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = Path(dirpath) / name
                stat = path.lstat()
                state[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return state


def loader_prompt(model, text_encoder=FROM_FOLDER, vae=FROM_FOLDER):
    """The smallest prompt that runs the loader: its VAE decodes an empty latent into SaveImage."""
    g = graph()
    loader = g.node("LTModelLoader", model=model, text_encoder=text_encoder, vae=vae, weight_dtype="default")
    decode_and_save(g, empty_latent(g, 16, 16).out(0), loader.out(2), "loader_errors")
    return g.finalize()


def assert_refused(comfy_host, tiny_models, roots, prompt, *expected):
    """The prompt fails with a message holding every ``expected`` string, and no file changed anywhere."""
    watched = (tiny_models, *roots.values(), comfy_host.output_dir)
    before = snapshot(*watched)
    with pytest.raises(PromptFailed) as info:
        comfy_host.run(prompt)
    message = str(info.value)
    for text in expected:
        assert str(text) in message, f"{text!r} not in {message}"
    assert snapshot(*watched) == before
    return message


# ---------------------------------------------------------------- not a Lumina / Z-Image folder


def test_diffusers_folder_of_another_model(comfy_host, tiny_models, roots):
    folder = clone(tiny_models, "lumina2", roots["diffusers"] / "flux-like", copy=["transformer/config.json"])
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "_class_name": "FluxTransformer2DModel"}))
    (folder / "model_index.json").unlink()
    assert_refused(comfy_host, tiny_models, roots, loader_prompt("flux-like"), config_path,
                   "Lumina2Transformer2DModel or ZImageTransformer2DModel", "'FluxTransformer2DModel'")  # fmt: skip


def test_sd_like_unet_folder(comfy_host, tiny_models, roots):
    folder = roots["diffusers"] / "sd-like"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert_refused(comfy_host, tiny_models, roots, loader_prompt("sd-like"), folder / "model_index.json",
                   "Lumina2Pipeline", "'StableDiffusionPipeline'")  # fmt: skip
    (folder / "model_index.json").unlink()  # without an index: the missing transformer is named
    assert_refused(comfy_host, tiny_models, roots, loader_prompt("sd-like"),
                   folder / "transformer" / "config.json", "it does not exist")  # fmt: skip


def test_single_file_of_another_model(comfy_host, tiny_models, roots):
    """A Flux-named transformer file is refused from its header names, before the prompt runs."""
    path = roots["diffusion_models"] / "flux-like.safetensors"
    flux_keys = ("img_in.weight", "double_blocks.0.img_attn.qkv.weight", "final_layer.linear.weight")
    safetensors.torch.save_file({key: torch.zeros(8, 8) for key in flux_keys}, str(path))
    prompt = loader_prompt(path.name, file_name("lumina2", "text_encoder"), file_name("lumina2", "vae"))
    assert_refused(comfy_host, tiny_models, roots, prompt, "ComfyUI refused the prompt", path,
                   "a Lumina-Image-2.0 or Z-Image transformer", "'double_blocks.0.img_attn.qkv.weight'")  # fmt: skip


# ---------------------------------------------------------------- transformer and text encoder that do not pair


@pytest.mark.parametrize("layout", ["single file", "folder"])
def test_gemma_text_encoder_with_zimage_transformer(comfy_host, tiny_models, roots, layout):
    """Z-Image reads Qwen3 hidden states: a Gemma-2 file is refused before the prompt runs, naming both."""
    model = file_name("zimage", "transformer") if layout == "single file" else "tiny-random-zimage"
    vae = file_name("zimage", "vae") if layout == "single file" else FROM_FOLDER
    transformer = file_name("zimage", "transformer") if layout == "single file" else "transformer"
    prompt = loader_prompt(model, file_name("lumina2", "text_encoder"), vae)
    assert_refused(comfy_host, tiny_models, roots, prompt, "ComfyUI refused the prompt",
                   file_name("lumina2", "text_encoder"), transformer,
                   "a Qwen3 text encoder, which the Z-Image transformer", "it is a Gemma-2 text encoder")  # fmt: skip


def test_text_encoder_of_another_width(comfy_host, tiny_models, roots):
    """A Qwen3 whose hidden size (48) is not the Z-Image caption width (32) is refused, naming both files."""
    import transformers

    config = transformers.Qwen3Config(**{**tiny_factory.QWEN3_TINY, "hidden_size": 48, "vocab_size": 1024})
    state_dict = transformers.Qwen3Model(config).state_dict()
    path = roots["text_encoders"] / "qwen3-hidden-48.safetensors"
    safetensors.torch.save_file({f"model.{k}": v.contiguous() for k, v in state_dict.items()}, str(path))
    prompt = loader_prompt(file_name("zimage", "transformer"), path.name, file_name("zimage", "vae"))
    assert_refused(comfy_host, tiny_models, roots, prompt, "ComfyUI refused the prompt", path,
                   file_name("zimage", "transformer"), "hidden size 32", "its hidden size is 48")  # fmt: skip


# ---------------------------------------------------------------- broken weights


def test_missing_shard(comfy_host, tiny_models, roots):
    folder = clone(tiny_models, "lumina2", roots["diffusers"] / "missing-shard")
    missing = shard(folder, 2)
    missing.unlink()
    assert_refused(comfy_host, tiny_models, roots, loader_prompt("missing-shard"), missing,
                   "a shard listed in diffusion_pytorch_model.safetensors.index.json", "it does not exist")  # fmt: skip


def test_truncated_shard(comfy_host, tiny_models, roots):
    folder = clone(tiny_models, "lumina2", roots["diffusers"] / "truncated")
    truncated = shard(folder, 3)
    data = truncated.read_bytes()
    truncated.unlink()
    truncated.write_bytes(data[: len(data) // 2])
    assert_refused(comfy_host, tiny_models, roots, loader_prompt("truncated"), truncated,
                   "a complete, valid .safetensors file", "incomplete metadata")  # fmt: skip


def test_corrupt_header(comfy_host, tiny_models, roots):
    folder = clone(
        tiny_models,
        "lumina2",
        roots["diffusers"] / "corrupt-header",
        copy=["vae/diffusion_pytorch_model.safetensors"],
    )
    corrupt = folder / "vae" / "diffusion_pytorch_model.safetensors"
    with open(corrupt, "r+b") as f:
        f.seek(8)
        f.write(b"#not json#")
    assert_refused(comfy_host, tiny_models, roots, loader_prompt("corrupt-header"), corrupt,
                   "a complete, valid .safetensors file", "invalid JSON")  # fmt: skip


def test_corrupt_single_file(comfy_host, tiny_models, roots):
    path = roots["diffusion_models"] / "corrupt-transformer.safetensors"
    path.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    names = tiny_factory.file_names("lumina2")
    prompt = loader_prompt(path.name, names["text_encoder"].split("/")[1], names["vae"].split("/")[1])
    assert_refused(comfy_host, tiny_models, roots, prompt, path, "a complete, valid .safetensors file")


def test_config_that_disagrees_with_the_tensors(comfy_host, tiny_models, roots):
    folder = clone(
        tiny_models, "lumina2", roots["diffusers"] / "wrong-config", copy=["transformer/config.json"]
    )
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_kv_heads": 4}))  # the weights have 2 kv heads
    assert_refused(comfy_host, tiny_models, roots, loader_prompt("wrong-config"), config_path,
                   "config.json matches the weights", "attention.qkv.weight'] has shape (192, 96)")  # fmt: skip


def test_text_encoder_file_without_embeddings(comfy_host, tiny_models, roots):
    from lumina_turbo.loading import model_files
    from lumina_turbo.loading.errors import ModelFileError

    tensors = safetensors.torch.load_file(
        str(tiny_models / tiny_factory.file_names("zimage")["text_encoder"])
    )
    del tensors["model.embed_tokens.weight"]
    path = roots["text_encoders"] / "qwen3-without-embeddings.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    prompt = loader_prompt(file_name("zimage", "transformer"), path.name, file_name("zimage", "vae"))
    assert_refused(comfy_host, tiny_models, roots, prompt, "ComfyUI refused the prompt", path,
                   "a complete qwen3 text encoder", "model.embed_tokens.weight missing")  # fmt: skip
    # loaded directly (as the CLI trainer does), the same error
    with pytest.raises(ModelFileError, match="model.embed_tokens.weight missing"):
        model_files.load_text_encoder_file(path)


VAE_BREAKS = {  # how a copy of the tiny VAE file is broken, and what the message must say
    "mismatched": (
        lambda t: {**t, "decoder.conv_out.weight": torch.zeros(3, 64, 3, 3)},
        ["decoder.conv_out.weight is [3, 64, 3, 3], the VAE needs [3, 32, 3, 3]"],
    ),
    "incomplete": (
        lambda t: {k: v for k, v in t.items() if k != "decoder.up.0.block.0.conv1.weight"},
        ["missing ['decoder.up.0.block.0.conv1.weight']"],
    ),
    "without-an-encoder-level": (
        lambda t: {k: v for k, v in t.items() if not k.startswith("encoder.down.3.")},
        ["unexpected ['decoder.up.3."],
    ),
    "four-channel": (
        lambda t: {**t, "decoder.conv_in.weight": t["decoder.conv_in.weight"][:, :4].clone()},
        ["16-channel Flux-shaped VAE", "its latent has 4 channels"],
    ),
}


@pytest.mark.parametrize("name", list(VAE_BREAKS))
def test_vae_file_that_does_not_fit(comfy_host, tiny_models, roots, name):
    """ComfyUI raises torch's size mismatch for such files, or leaves missing tensors uninitialised."""
    tensors = safetensors.torch.load_file(str(tiny_models / tiny_factory.file_names("zimage")["vae"]))
    broken, expected = VAE_BREAKS[name]
    path = roots["vae"] / f"vae-{name}.safetensors"
    safetensors.torch.save_file(broken(tensors), str(path))
    prompt = loader_prompt(file_name("zimage", "transformer"), file_name("zimage", "text_encoder"), path.name)
    assert_refused(comfy_host, tiny_models, roots, prompt, path, "expected", *expected)


# ---------------------------------------------------------------- tokenizers


def test_missing_gemma_tokenizer_model(comfy_host, tiny_models, roots):
    folder = clone(tiny_models, "lumina2", roots["diffusers"] / "no-spm")
    (folder / "tokenizer" / "tokenizer.model").unlink()
    assert_refused(comfy_host, tiny_models, roots, loader_prompt("no-spm"), folder / "tokenizer" / "tokenizer.model",
                   "Gemma's SentencePiece model", "it does not exist")  # fmt: skip


def test_gemma_file_without_tokenizer(comfy_host, tiny_models, roots):
    """A plain HF Gemma-2 file has no SentencePiece model; ComfyUI's Lumina-2 tokenizer needs one."""
    import safetensors.torch

    names = tiny_factory.file_names("lumina2")
    tensors = safetensors.torch.load_file(str(tiny_models / names["text_encoder"]))
    del tensors["spiece_model"]
    path = roots["text_encoders"] / "gemma-without-spiece.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    prompt = loader_prompt(names["transformer"].split("/")[1], path.name, names["vae"].split("/")[1])
    assert_refused(
        comfy_host, tiny_models, roots, prompt, path, "the Gemma SentencePiece tokenizer", "spiece_model"
    )


def test_missing_qwen_tokenizer_folder(comfy_host, tiny_models, roots):
    folder = clone(tiny_models, "zimage", roots["diffusers"] / "no-qwen-tokenizer")
    shutil.rmtree(folder / "tokenizer")
    assert_refused(comfy_host, tiny_models, roots, loader_prompt("no-qwen-tokenizer"), folder / "tokenizer",
                   "the Qwen tokenizer folder")  # fmt: skip


def test_broken_parts_that_are_not_used_do_not_matter(comfy_host, tiny_models, roots):
    """A folder whose own VAE is truncated still loads when the vae input names a file instead."""
    folder = clone(tiny_models, "lumina2", roots["diffusers"] / "own-vae-broken")
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    data = vae.read_bytes()
    vae.unlink()
    vae.write_bytes(data[:100])
    vae_file = tiny_factory.file_names("lumina2")["vae"].split("/")[1]
    outputs = comfy_host.run(loader_prompt("own-vae-broken", vae=vae_file))
    assert len(comfy_host.image_paths(outputs)) == 1
