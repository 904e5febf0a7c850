"""The Flux-shaped 16-channel VAE (Lumina-Image-2.0 and Z-Image) as a ComfyUI VAE, at any width.

ComfyUI builds a VAE with a hard-coded width (ch=128, ch_mult 1,2,4,4, 2 res blocks). Full-size
files go straight through ``comfy.sd.VAE``; narrower ones are built through its ``config`` path
with the sizes read from the tensors. That path always has quant convs, which the Flux VAE lacks,
so identity 1x1 convs stand in for them (an exact no-op).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

from .errors import ModelFileError
from .safetensors_io import load_folder_state_dict

FULL_SIZE = {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2}
LATENT_CHANNELS = 16
# torch's load_state_dict wording for a tensor of another shape
SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[\d, ]*\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((\[[\d, ]*\])\)"
)


def vae_ddconfig(sd: dict[str, torch.Tensor], source: str) -> dict:
    """Encoder/decoder sizes of an LDM-keyed VAE state dict."""
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        z_channels = sd["decoder.conv_in.weight"].shape[1]
        levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        ch_mult = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels]
    except KeyError as exc:
        raise ModelFileError(
            source,
            "a VAE with encoder.conv_in, decoder.conv_in and encoder.down.N.block.0 weights",
            f"{exc.args[0]!r} is missing",
        ) from exc
    if z_channels != LATENT_CHANNELS:
        raise ModelFileError(
            source,
            f"the {LATENT_CHANNELS}-channel Flux-shaped VAE of Lumina-Image-2.0 / Z-Image",
            f"its latent has {z_channels} channels",
        )
    num_res_blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    return {
        "double_z": True,
        "z_channels": z_channels,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": ch,
        "ch_mult": ch_mult,
        "num_res_blocks": num_res_blocks,
        "attn_resolutions": [],
        "dropout": 0.0,
    }


def vae_from_state_dict(sd: dict[str, torch.Tensor], source: str):
    import comfy.diffusers_convert

    if "decoder.up_blocks.0.resnets.0.norm1.weight" in sd:  # diffusers key names
        sd = comfy.diffusers_convert.convert_vae_state_dict(sd)
    ddconfig = vae_ddconfig(sd, source)
    sizes = {k: ddconfig[k] for k in FULL_SIZE}
    if sizes == FULL_SIZE:
        return _checked_vae(sd, source, sizes)
    z = ddconfig["z_channels"]
    sd = dict(sd)
    if "quant_conv.weight" not in sd:
        sd["quant_conv.weight"] = torch.eye(2 * z, dtype=torch.float32)[:, :, None, None]
        sd["quant_conv.bias"] = torch.zeros(2 * z)
        sd["post_quant_conv.weight"] = torch.eye(z, dtype=torch.float32)[:, :, None, None]
        sd["post_quant_conv.bias"] = torch.zeros(z)
    vae = _checked_vae(sd, source, sizes, config={"params": {"embed_dim": z, "ddconfig": ddconfig}})
    vae.latent_channels = z  # the config path leaves ComfyUI's SD1 default of 4
    return vae


def _checked_vae(sd: dict[str, torch.Tensor], source: str, sizes: dict, config: dict | None = None):
    """comfy.sd.VAE, refused unless it holds exactly the file's tensors.

    ComfyUI loads a VAE non-strictly: it raises torch's size-mismatch error for a tensor of another
    shape, and leaves a missing tensor uninitialised (only a log line says so).
    """
    import comfy.sd

    expected = f"a complete Flux-shaped VAE of the sizes its tensors give ({sizes})"
    try:
        vae = comfy.sd.VAE(sd=sd, config=config)
    except RuntimeError as exc:
        mismatches = [
            f"{name} is {list(ast.literal_eval(got))}, the VAE needs {list(ast.literal_eval(needed))}"
            for name, got, needed in SIZE_MISMATCH.findall(str(exc))
        ]
        raise ModelFileError(source, expected, "; ".join(mismatches[:3]) or str(exc)) from exc
    held = set(vae.first_stage_model.state_dict())
    missing, unexpected = sorted(held - set(sd)), sorted(set(sd) - held)
    if missing or unexpected:
        raise ModelFileError(source, expected, f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return vae


def vae_from_diffusers_folder(folder: str | Path):
    vae_dir = Path(folder) / "vae"
    if not vae_dir.is_dir():
        raise ModelFileError(vae_dir, "the diffusers VAE folder (AutoencoderKL)")
    return vae_from_state_dict(load_folder_state_dict(vae_dir), str(vae_dir))
