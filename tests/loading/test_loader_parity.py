"""LTModelLoader's outputs against the diffusers / transformers oracles, on the tiny model files.

Everything here goes through the node ComfyUI loaded (``LTModelLoader.execute`` in-process):
the transformer it returns predicts what the diffusers transformer predicts; its CLIP tokenizes
like the diffusers tokenizers and encodes to the hidden state each diffusers pipeline feeds the
transformer; its VAE decodes like diffusers' AutoencoderKL; single files give the same model as
the diffusers folder; weight_dtype and the family's flow shift are what they should be.
"""

import json

import pytest
import torch
from test_nextdit_parity import CAP_LEN, CASES, REL_TOL, diffusers_output, make_inputs, rel_err

from lumina_turbo.devtools import tiny_factory
from lumina_turbo.devtools.prompts import FROM_FOLDER

FAMILIES = tiny_factory.FAMILIES
PROMPTS = ["a red cat", "A Detailed PORTRAIT of an old woman, 8k; high-quality (painting) & light!", ""]
LUMINA2_SYSTEM = (
    "You are an assistant designed to generate superior images with the superior degree of image-text "
    "alignment based on textual prompts or user prompts."
)  # CLIPTextEncodeLumina2's "superior", the Lumina2Pipeline default


def file_choice(family, part):
    return tiny_factory.file_names(family)[part].split("/", 1)[1]


def run_loader(comfy_host, family, source="folder", weight_dtype="default", model=None):
    """(MODEL, CLIP, VAE) from the LTModelLoader class ComfyUI registered, as the executor calls it.

    ``model`` names another transformer file for ``source="single"``.
    """
    import nodes

    node = nodes.NODE_CLASS_MAPPINGS["LTModelLoader"]
    if source == "folder":
        inputs = dict(model=f"tiny-random-{family}", text_encoder=FROM_FOLDER, vae=FROM_FOLDER)
    else:
        inputs = {part: file_choice(family, key) for part, key in
                  (("model", "transformer"), ("text_encoder", "text_encoder"), ("vae", "vae"))}  # fmt: skip
        inputs["model"] = model or inputs["model"]
    inputs["weight_dtype"] = weight_dtype
    assert node.validate_inputs(**inputs) is True
    return node.execute(**inputs).args


@pytest.fixture(scope="module")
def loaded(comfy_host):
    cache = {}

    def get(family, source="folder"):
        if (family, source) not in cache:
            cache[(family, source)] = run_loader(comfy_host, family, source)
        return cache[(family, source)]

    return get


def folder(tiny_models, family):
    return tiny_models / tiny_factory.file_names(family)["diffusers"]


# ---------------------------------------------------------------- transformer


@pytest.fixture(scope="module")
def diffusers_transformers(tiny_models):
    from diffusers import Lumina2Transformer2DModel, ZImageTransformer2DModel

    classes = {"lumina2": Lumina2Transformer2DModel, "zimage": ZImageTransformer2DModel}
    return {f: classes[f].from_pretrained(folder(tiny_models, f) / "transformer").eval() for f in FAMILIES}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_transformer_matches_diffusers(loaded, diffusers_transformers, family, case):
    """apply_model of the MODEL output == x - sigma * velocity, velocity = -diffusers_output(x, 1 - sigma)."""
    model = loaded(family)[0].model
    x, ctx, sigma = make_inputs(case, model.diffusion_model.cap_embedder[1].weight.shape[1], seed=11)
    ref = diffusers_output(diffusers_transformers[family], family, x, 1 - sigma, ctx)
    assert torch.isfinite(ref).all() and ref.abs().max() > 0.1
    with torch.no_grad():
        denoised = model.apply_model(x, sigma, c_crossattn=ctx, num_tokens=CAP_LEN)
    expected = x + sigma.view(-1, 1, 1, 1) * ref
    assert rel_err(denoised, expected) <= REL_TOL
    assert rel_err((x - denoised) / sigma.view(-1, 1, 1, 1), -ref) <= REL_TOL  # the velocity itself


@pytest.mark.parametrize("family", FAMILIES)
def test_single_files_give_the_folder_model(loaded, family):
    """ComfyUI-style single files (NextDiT keys, HF text encoder, LDM VAE) == the diffusers folder."""
    from_folder, from_files = loaded(family, "folder"), loaded(family, "single")
    a = from_folder[0].model.diffusion_model.state_dict()
    b = from_files[0].model.diffusion_model.state_dict()
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert from_folder[0].model.model_config.unet_config == from_files[0].model.model_config.unet_config
    x, ctx, sigma = make_inputs("non_square", a["cap_embedder.1.weight"].shape[1], seed=5)
    with torch.no_grad():
        preds = [
            m[0].model.apply_model(x, sigma, c_crossattn=ctx, num_tokens=CAP_LEN)
            for m in (from_folder, from_files)
        ]
    assert torch.equal(preds[0], preds[1])


@pytest.fixture
def diffusion_models_root(tmp_path, comfy_host):
    """A temporary models/diffusion_models/ root registered with ComfyUI, for files derived from the tiny ones."""
    import folder_paths

    folder_paths.add_model_folder_path("diffusion_models", str(tmp_path))
    yield tmp_path
    folder_paths.folder_names_and_paths["diffusion_models"][0].remove(str(tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_without_norm_final(comfy_host, tiny_models, loaded, diffusion_models_root, family):
    """Released ComfyUI files lack the unused norm_final.weight (diffusers drops it, ComfyUI's loader
    leaves it unset): it loads, gets ones like a converted diffusers folder, and predicts the same."""
    import safetensors.torch

    tensors = safetensors.torch.load_file(tiny_models / tiny_factory.file_names(family)["transformer"])
    assert tensors.pop("norm_final.weight").shape == (tensors["cap_embedder.1.weight"].shape[0],)
    path = diffusion_models_root / f"{family}-without-norm-final.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    model = run_loader(comfy_host, family, "single", model=path.name)[0].model
    reference = loaded(family, "single")[0].model
    norm_final = model.diffusion_model.norm_final.weight
    assert torch.equal(norm_final, torch.ones_like(norm_final))
    x, ctx, sigma = make_inputs("non_square", tensors["cap_embedder.1.weight"].shape[1], seed=7)
    with torch.no_grad():
        got = model.apply_model(x, sigma, c_crossattn=ctx, num_tokens=CAP_LEN)
        ref = reference.apply_model(x, sigma, c_crossattn=ctx, num_tokens=CAP_LEN)
    assert torch.equal(got, ref)


def test_all_in_one_checkpoint_reads_only_its_transformer(tmp_path, tiny_models, loaded):
    """Transformer keys under model.diffusion_model. beside other parts: the same model as the single file."""
    import safetensors.torch

    from lumina_turbo.loading import model_files

    names = tiny_factory.file_names("lumina2")
    tensors = {
        f"model.diffusion_model.{k}": v
        for k, v in safetensors.torch.load_file(tiny_models / names["transformer"]).items()
    }
    tensors.update(
        {f"vae.{k}": v for k, v in safetensors.torch.load_file(tiny_models / names["vae"]).items()}
    )
    tensors["text_encoders.gemma2_2b.transformer.model.norm.weight"] = torch.ones(32)
    safetensors.torch.save_file(tensors, str(tmp_path / "all_in_one.safetensors"))
    model = model_files.load_transformer_file(
        tmp_path / "all_in_one.safetensors"
    ).model.diffusion_model.state_dict()
    reference = loaded("lumina2", "single")[0].model.diffusion_model.state_dict()
    assert sorted(model) == sorted(reference)
    assert all(torch.equal(model[k], reference[k]) for k in model)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_flow_shift(loaded, tiny_models, family):
    """Stock samplers read the shift from model_sampling: 6 for Lumina-2, 3 for Z-Image (= scheduler_config)."""
    model = loaded(family)[0].model
    shift = {"lumina2": 6.0, "zimage": 3.0}[family]
    scheduler = json.loads((folder(tiny_models, family) / "scheduler" / "scheduler_config.json").read_text())
    assert model.model_sampling.shift == shift == scheduler["shift"]
    assert type(model.model_config).__name__ == {"lumina2": "Lumina2", "zimage": "ZImage"}[family]
    # ComfyUI's flow time shift, sigma(t) = s t / (1 + (s - 1) t), at t = 0.5 (percent 0.5)
    assert model.model_sampling.percent_to_sigma(0.5) == pytest.approx(
        shift * 0.5 / (1 + (shift - 1) * 0.5), abs=2e-3
    )


def test_weight_dtype_option(comfy_host, loaded):
    """Files hold fp32: 'default' keeps fp32, 'bf16' gives bf16 weights and a close prediction."""
    default = loaded("lumina2")[0].model
    bf16 = run_loader(comfy_host, "lumina2", weight_dtype="bf16")[0].model
    assert {t.dtype for t in default.diffusion_model.state_dict().values()} == {torch.float32}
    assert {t.dtype for t in bf16.diffusion_model.state_dict().values()} == {torch.bfloat16}
    x, ctx, sigma = make_inputs("square", 32, seed=2)
    with torch.no_grad():
        ref = default.apply_model(x, sigma, c_crossattn=ctx, num_tokens=CAP_LEN)
        got = bf16.apply_model(x, sigma, c_crossattn=ctx, num_tokens=CAP_LEN)
    assert rel_err(got.float(), ref) < 0.05


# ---------------------------------------------------------------- text encoders


@pytest.fixture(scope="module")
def pipelines(tiny_models):
    """The diffusers pipelines with only their tokenizer and text encoder loaded."""
    from diffusers import Lumina2Pipeline, ZImagePipeline

    classes = {"lumina2": Lumina2Pipeline, "zimage": ZImagePipeline}
    return {
        f: classes[f].from_pretrained(folder(tiny_models, f), transformer=None, vae=None) for f in FAMILIES
    }


def comfy_text(family, prompt):
    """What the graph's text node hands the tokenizer (CLIPTextEncodeLumina2 / CLIPTextEncode).

    ComfyUI's Gemma tokenizer reads ``(text)`` as emphasis (its prompt-weight syntax); a user who
    means literal parentheses writes ``\\(text\\)``. Its Z-Image tokenizer takes the text literally.
    """
    if family == "zimage":
        return prompt
    escaped = prompt.replace("(", "\\(").replace(")", "\\)")
    return f"{LUMINA2_SYSTEM} <Prompt Start> {escaped}"


def diffusers_token_ids(pipe, family, prompt):
    if family == "lumina2":
        return pipe.tokenizer(f"{LUMINA2_SYSTEM} <Prompt Start> {prompt}").input_ids
    messages = [{"role": "user", "content": prompt}]
    text = pipe.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    return pipe.tokenizer(text).input_ids


@pytest.mark.parametrize("source", ["folder", "single"])
@pytest.mark.parametrize("family", FAMILIES)
def test_token_ids_match_diffusers_tokenizer(loaded, pipelines, family, source):
    clip = loaded(family, source)[1]
    for prompt in PROMPTS:
        tokens = clip.tokenize(comfy_text(family, prompt))
        (batches,) = tokens.values()
        comfy_ids = [token for batch in batches for token, _weight in batch]
        assert comfy_ids == diffusers_token_ids(pipelines[family], family, prompt), prompt


@pytest.mark.parametrize("source", ["folder", "single"])
@pytest.mark.parametrize("family", FAMILIES)
def test_text_encoder_matches_pipeline_hidden_state(loaded, pipelines, family, source):
    """The CLIP output == the padded, masked hidden_states[-2] the pipeline gives its transformer."""
    clip, pipe = loaded(family, source)[1], pipelines[family]
    prompts = PROMPTS[:2]
    with torch.no_grad():
        if family == "lumina2":
            embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                                    system_prompt=LUMINA2_SYSTEM)  # fmt: skip
            refs = [e[m.bool()] for e, m in zip(embeds, mask, strict=True)]
            assert mask.shape[1] == 256 and not mask.all()  # right-padded batch, as the pipeline runs it
        else:
            # (_encode_prompt writes the chat-templated text back into the list it is given)
            refs, _ = pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=False)
    for prompt, ref in zip(prompts, refs, strict=True):
        out = clip.encode_from_tokens(clip.tokenize(comfy_text(family, prompt)), return_dict=True)
        cond = out["cond"][0]
        assert cond.shape == ref.shape, prompt
        assert (cond - ref).abs().max() <= 1e-5 * ref.abs().max(), prompt


# ---------------------------------------------------------------- VAE


@pytest.mark.parametrize("source", ["folder", "single"])
def test_vae_decode_matches_diffusers(tiny_models, loaded, source):
    """VAEDecode(process_latent_out(x)) == the pipelines' decode of model-space latents x.

    Pipelines: image = vae.decode(x / scaling_factor + shift_factor), then (image / 2 + 0.5) clamped
    to [0, 1], (B, C, H, W). ComfyUI: the sampler's process_latent_out (Flux latent format) does the
    un-scaling, VAEDecode returns (B, H, W, C) in [0, 1].
    """
    from diffusers import AutoencoderKL

    model, _, vae = loaded("zimage", source)
    oracle = AutoencoderKL.from_pretrained(folder(tiny_models, "zimage") / "vae").eval()
    latent_format = model.model.latent_format
    assert (latent_format.scale_factor, latent_format.shift_factor) == (
        oracle.config.scaling_factor,
        oracle.config.shift_factor,
    )
    x = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = oracle.decode(x / oracle.config.scaling_factor + oracle.config.shift_factor).sample
        ref = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        got = vae.decode(model.model.process_latent_out(x))
    assert got.shape == ref.shape == (2, 64, 96, 3)
    assert 0.05 < ref.std() and (ref > 0).float().mean() > 0.9  # not a saturated or flat oracle image
    assert (got - ref).abs().max() <= 1e-5
