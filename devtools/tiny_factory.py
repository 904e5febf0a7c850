"""Tiny, randomly initialised models of the real architectures, for tests, demos and benchmarks.

Nothing here is a trained model: every file is named ``tiny-random-*`` so nobody mistakes it for
real weights. Each family is written twice, from the same tensors:

* as a diffusers folder (``save_pretrained`` of the real diffusers / transformers classes:
  transformer sharded with an index json, text_encoder/, tokenizer/, vae/, scheduler/,
  model_index.json) — what people download from the hub;
* as ComfyUI-style single files (``diffusion_models/``, ``text_encoders/``, ``vae/``) — what
  people download repackaged for ComfyUI.

Lumina-Image-2.0: Gemma-2 text encoder with a small SentencePiece tokenizer (packed into the
single file as ``spiece_model`` the way ComfyUI's Lumina-2 tokenizer expects).
Z-Image: Qwen3 text encoder with the Qwen tokenizer ComfyUI ships (and the Qwen3 chat template).
Both: a 16-channel Flux-shaped VAE (no quant convs, Flux latent scale/shift), narrow.
Deterministic: the same seed gives bit-identical files.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import tempfile
from pathlib import Path

import torch

from .tiny_transformers import reinit_parameters, tiny_lumina2_transformer, tiny_zimage_transformer

FAMILIES = ("lumina2", "zimage")

# Text encoder sizes. ComfyUI's Gemma-2 and Qwen3 classes fix head_dim (256 and 128) as class
# attributes, so the tiny encoders keep those head sizes and shrink everything else.
GEMMA2_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    hidden_activation="gelu_pytorch_tanh",
    # ComfyUI's Gemma-2 has no attention soft-capping: leave it off so both stacks are one network.
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
QWEN3_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    vocab_size=151936,
)
VAE_TINY = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=256,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)
# The official Qwen3 chat template reduced to what text-to-image prompts use; with
# enable_thinking=True it renders exactly ComfyUI's Z-Image template.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
_WORDS = (
    "a an the of in on with and photo painting portrait landscape red green blue yellow white black "
    "cat dog bird horse house tree forest sky sun moon river mountain city street night day light "
    "woman man child old young small large beautiful detailed high quality style art 8k"
).split()


def gemma_spiece_model(vocab_size: int = 512, seed: int = 0) -> bytes:
    """Train a small SentencePiece model with Gemma's conventions (ids and normalisation)."""
    import sentencepiece as spm

    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(_WORDS) for _ in range(12)) for _ in range(3000)]
    sentences.append("You are an assistant designed to generate superior images <Prompt Start>")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


def comfy_qwen_tokenizer_dir() -> Path:
    """The Qwen tokenizer that ComfyUI ships (the one its Z-Image text encoder uses)."""
    import comfy.text_encoders.z_image

    return Path(comfy.text_encoders.z_image.__file__).parent / "qwen25_tokenizer"


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    # gain 0.3 keeps the decoded pixels mostly inside [-1, 1], so images are not saturated
    return reinit_parameters(AutoencoderKL(**VAE_TINY), seed, gain=0.3).eval()


def tiny_text_encoder(family: str, hidden_size: int, seed: int = 0, vocab_size: int | None = None):
    import transformers

    if family == "lumina2":
        config = transformers.Gemma2Config(
            **{**GEMMA2_TINY, "hidden_size": hidden_size, "vocab_size": vocab_size}
        )
        model = transformers.Gemma2Model(config)
    else:
        config = transformers.Qwen3Config(**{**QWEN3_TINY, "hidden_size": hidden_size})
        model = transformers.Qwen3Model(config)
    return reinit_parameters(model, seed + 1).eval()


def tiny_tokenizer(family: str, workdir: Path):
    import transformers

    if family == "lumina2":
        spiece = gemma_spiece_model()
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "tokenizer.model").write_bytes(spiece)
        tok = transformers.GemmaTokenizer.from_pretrained(workdir, add_bos_token=True)
        return tok, spiece
    tok = transformers.Qwen2Tokenizer.from_pretrained(comfy_qwen_tokenizer_dir())
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok, None


def tiny_pipeline(family: str, seed: int = 0, workdir: Path | None = None):
    """The diffusers pipeline of ``family`` built from tiny random components.

    Returns ``(pipeline, spiece_model)``; the SentencePiece bytes (Lumina-2 only, else None) are
    what ComfyUI's Gemma tokenizer reads from the text-encoder file.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, ZImagePipeline

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="lt-tok-"))
    tokenizer, spiece = tiny_tokenizer(family, workdir / "spm")
    if family == "lumina2":
        transformer = tiny_lumina2_transformer(seed)
        text_encoder = tiny_text_encoder(
            family, transformer.config.cap_feat_dim, seed, vocab_size=len(tokenizer)
        )
        scheduler = FlowMatchEulerDiscreteScheduler(shift=6.0)
        pipe = Lumina2Pipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=tiny_vae(seed),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )
    else:
        transformer = tiny_zimage_transformer(seed)
        text_encoder = tiny_text_encoder(family, transformer.config.cap_feat_dim, seed)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        pipe = ZImagePipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=tiny_vae(seed),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )
    return pipe, spiece


def write_diffusers_folder(pipe, folder: Path, spiece: bytes | None = None) -> Path:
    """``save_pretrained`` with the transformer split into several shards (plus its index json).

    Like the released Lumina-Image-2.0 folder, tokenizer/ also holds Gemma's ``tokenizer.model``.
    """
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    if spiece is not None:
        (folder / "tokenizer" / "tokenizer.model").write_bytes(spiece)
    # transformers records the temporary path the tokenizer was built from; the folder's own
    # tokenizer.model is what loads, and a released folder names no path of the machine it came from.
    tokenizer_config = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(tokenizer_config.read_text())
    if config.pop("vocab_file", None) is not None:
        tokenizer_config.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(folder / "transformer")
    n_bytes = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    pipe.transformer.save_pretrained(
        folder / "transformer", safe_serialization=True, max_shard_size=max(n_bytes // 3, 1)
    )
    shards = sorted((folder / "transformer").glob("*.safetensors"))
    if len(shards) < 2:
        raise RuntimeError(f"expected a sharded transformer in {folder}, got {shards}")
    return folder


def comfy_single_files(pipe, family: str, spiece: bytes | None) -> dict[str, dict[str, torch.Tensor]]:
    """ComfyUI-style state dicts: NextDiT keys, HF-native text encoder (+spiece), LDM VAE keys."""
    from comfy.diffusers_convert import convert_vae_state_dict

    from ..loading.nextdit_keys import diffusers_to_comfy

    transformer_sd = diffusers_to_comfy(pipe.transformer.state_dict(), family=family)
    te_sd = {f"model.{k}": v for k, v in pipe.text_encoder.state_dict().items()}
    if spiece is not None:
        te_sd["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    vae_sd = convert_vae_state_dict(pipe.vae.state_dict())
    return {"transformer": transformer_sd, "text_encoder": te_sd, "vae": vae_sd}


def file_names(family: str) -> dict[str, str]:
    """Names under ComfyUI's models/ folders (``folder/name``)."""
    te = "tiny-random-gemma2" if family == "lumina2" else "tiny-random-qwen3"
    return {
        "diffusers": f"diffusers/tiny-random-{family}",
        "transformer": f"diffusion_models/tiny-random-{family}.safetensors",
        "text_encoder": f"text_encoders/{te}.safetensors",
        "vae": "vae/tiny-random-flux-vae.safetensors",
    }


def write_family(models_dir: Path, family: str, seed: int = 0) -> dict[str, Path]:
    """Write both layouts of one family under a ComfyUI ``models/`` folder; returns the paths."""
    import safetensors.torch

    meta = {"lumina_turbo": "tiny random test model, not trained", "family": family, "seed": str(seed)}
    models_dir = Path(models_dir)
    paths = {k: models_dir / v for k, v in file_names(family).items()}
    with tempfile.TemporaryDirectory(prefix="lt-tiny-") as work:
        pipe, spiece = tiny_pipeline(family, seed, workdir=Path(work) / "tokenizer")
        staged = write_diffusers_folder(pipe, Path(work) / "folder", spiece)
        (staged / "lumina_turbo_tiny.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(paths["diffusers"], ignore_errors=True)
        paths["diffusers"].parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), str(paths["diffusers"]))
    for part, sd in comfy_single_files(pipe, family, spiece).items():
        paths[part].parent.mkdir(parents=True, exist_ok=True)
        tmp = paths[part].with_suffix(".tmp")
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=meta)
        tmp.replace(paths[part])
    return paths


def write_all(models_dir: Path, seed: int = 0) -> dict[str, dict[str, Path]]:
    return {family: write_family(models_dir, family, seed) for family in FAMILIES}
