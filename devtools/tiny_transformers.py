"""Deterministic tiny diffusers transformers (Lumina-Image-2.0 and Z-Image) for tests and demos.

diffusers zero-initialises some layers (adaLN, the final layer, pad tokens), which would make every
prediction zero; so every parameter is re-drawn from the seed with a scale that keeps activations
of order one (:func:`reinit_parameters`, also used for the tiny text encoders and VAE).

Sizes are chosen so that diffusers and ComfyUI build the same network:

- Lumina-2: grouped-query attention (4 heads, 2 kv heads), 3-axis RoPE, theta 10000.
- Z-Image: dim 1024 is the smallest size where diffusers' timestep embedder (256->1024->min(dim,256))
  equals ComfyUI's (256->min(dim,1024)->256). Its FFN width int(1024/3*8) = 2730 is not a multiple
  of 256, which ComfyUI reproduces with ``multiple_of`` 2 (see ``nextdit_config.ffn_settings``).

axes_lens are ComfyUI's defaults: they cannot be read from tensors (so shape inference would not
reproduce other values), ComfyUI never uses them, and diffusers' RoPE tables for them are tiny.
"""

import torch

TINY_LUMINA2_CONFIG = {
    "patch_size": 2,
    "in_channels": 16,
    "hidden_size": 96,
    "num_layers": 2,
    "num_refiner_layers": 1,
    "num_attention_heads": 4,
    "num_kv_heads": 2,
    "multiple_of": 16,
    "ffn_dim_multiplier": None,
    "norm_eps": 1e-5,
    "axes_dim_rope": (8, 8, 8),
    "axes_lens": (300, 512, 512),
    "cap_feat_dim": 32,
}

TINY_ZIMAGE_CONFIG = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 1024,
    "n_layers": 1,  # dim 1024 blocks are the cost of every test that runs this model
    "n_refiner_layers": 1,
    "n_heads": 8,
    "n_kv_heads": 8,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 32,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}


@torch.no_grad()
def reinit_parameters(model, seed, gain=1.0):
    """Redraw every parameter of ``model`` from ``seed`` (same seed -> same weights, any machine).

    Weights ~ N(0, gain² / fan_in), norm weights ~ 1 + N(0, 0.1²), biases ~ N(0, 0.1²), pad tokens
    ~ N(0, 0.5²). The libraries zero-initialise some layers (adaLN, output projections, pad tokens),
    which would make a random model's output trivially zero.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if name.endswith("pad_token"):
            value = 0.5 * noise
        elif param.ndim >= 2:
            value = gain * noise / param[0].numel() ** 0.5
        elif "norm" in name:
            value = 1.0 + 0.1 * noise
        else:  # biases
            value = 0.1 * noise
        param.copy_(value.to(param.dtype))
    return model


def tiny_lumina2_transformer(seed=0):
    """A small diffusers ``Lumina2Transformer2DModel`` (fp32, eval) with seeded non-zero weights."""
    from diffusers import Lumina2Transformer2DModel

    model = Lumina2Transformer2DModel(**TINY_LUMINA2_CONFIG)
    return reinit_parameters(model, seed).eval()


def tiny_zimage_transformer(seed=0):
    """A small diffusers ``ZImageTransformer2DModel`` (fp32, eval) with seeded non-zero weights."""
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(**TINY_ZIMAGE_CONFIG)
    return reinit_parameters(model, seed).eval()
