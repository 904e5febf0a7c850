"""The trainer's single loss entry point: the AC-RF trainer's loss modes and their parameters.

Time convention: ComfyUI sigma (1 = noise, 0 = data); x_sigma = (1 - sigma) x0 + sigma eps; target
v = eps - x0 (denoised = x - sigma v). Lumina t = 1 - sigma; diffusers timestep = 1000 sigma.

Modes (AC-RF's ``loss_mode``; every mode starts from the hybrid velocity loss of flow.py):

  standard  = lambda_mse MSE(v) + lambda_l1 L1(v) + lambda_cos (1 - cos v) + lambda_fft FFT(x0)
  frequency = standard + lambda_freq  * [alpha_hf L1(high x0) + beta_lf (1 - cos(low x0))]
  style     = standard + lambda_style * [lambda_struct (1 - SSIM(L)) + lambda_light moments(L)
                                         + lambda_color moments(ab) + lambda_tex L1(high L)]
  unified   = standard + both bracketed terms

The base terms compare velocities; the frequency, FFT and style terms compare the denoised latents
x̂0 = x_sigma - sigma v̂ and x0 = x_sigma - sigma v (image properties; see frequency.py/style.py).
With the defaults, ``frequency`` is exactly the AC-RF write-up's "MSE + α·L1(high frequencies) + β·Cos(low frequencies)". AC-RF's v2
script scaled the two blocks by lambda_freq = lambda_style = 0.3; set those to reproduce it.
"""

from __future__ import annotations

import math

import torch

from ..samplers.flow import denoised_from_velocity, per_sample_sigma
from .common import check_same_shape, compute_dtype
from .flow import hybrid_flow_loss
from .frequency import check_downsample_factor, fft_highpass_loss, frequency_band_loss
from .style import style_structure_loss

_BASE = {"lambda_mse": 1.0, "lambda_l1": 0.0, "lambda_cos": 0.0, "lambda_fft": 0.0}
_FREQUENCY = {"lambda_freq": 1.0, "alpha_hf": 1.0, "beta_lf": 0.2}
_STYLE = {
    "lambda_style": 1.0,
    "lambda_struct": 1.0,
    "lambda_light": 0.5,
    "lambda_color": 0.3,
    "lambda_tex": 0.5,
    "ssim_data_range": 1.0,
}
_BANDS = {"downsample_factor": 4}

LOSS_MODES: dict[str, dict[str, float]] = {
    "standard": {**_BASE},
    "frequency": {**_BASE, **_FREQUENCY, **_BANDS},
    "style": {**_BASE, **_STYLE, **_BANDS},
    "unified": {**_BASE, **_FREQUENCY, **_STYLE, **_BANDS},
}


def loss_mode_defaults(mode: str) -> dict[str, float]:
    """A fresh dict of the parameters ``mode`` accepts, with their defaults."""
    if mode not in LOSS_MODES:
        raise ValueError(f"loss mode must be one of {sorted(LOSS_MODES)}, got {mode!r}")
    return dict(LOSS_MODES[mode])


# Weights beyond this only overflow the loss; a bound keeps a prompt from asking for it.
MAX_LOSS_PARAM = 1e4


def resolve_loss_params(mode: str, params: dict | None = None) -> dict[str, float]:
    """Defaults of ``mode`` overridden by ``params``, validated.

    Raises ValueError naming every parameter the mode does not accept (a typo, or a parameter of
    another mode), and any value that is not a number in [0, MAX_LOSS_PARAM].
    """
    resolved = loss_mode_defaults(mode)
    params = dict(params or {})
    unknown = sorted(set(params) - set(resolved))
    if unknown:
        raise ValueError(
            f"unknown loss parameter(s) for mode {mode!r}: {unknown}; accepted: {sorted(resolved)}"
        )
    for name, value in params.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 0 <= value <= MAX_LOSS_PARAM
        ):
            raise ValueError(
                f"loss parameter {name!r} must be a finite number >= 0 and <= {MAX_LOSS_PARAM:g}, got {value!r}"
            )
        resolved[name] = float(value)
    if "downsample_factor" in resolved:
        resolved["downsample_factor"] = check_downsample_factor(resolved["downsample_factor"])
    if resolved.get("ssim_data_range", 1.0) <= 0:
        raise ValueError(f"loss parameter 'ssim_data_range' must be > 0, got {resolved['ssim_data_range']!r}")
    if not _has_active_term(resolved):
        raise ValueError(f"every loss weight of mode {mode!r} is 0: nothing would be trained ({params})")
    return resolved


def _has_active_term(resolved: dict[str, float]) -> bool:
    base = any(resolved[name] > 0 for name in _BASE)
    frequency = resolved.get("lambda_freq", 0) > 0 and (resolved["alpha_hf"] > 0 or resolved["beta_lf"] > 0)
    style_terms = ("lambda_struct", "lambda_light", "lambda_color", "lambda_tex")
    style = resolved.get("lambda_style", 0) > 0 and any(resolved[name] > 0 for name in style_terms)
    return base or frequency or style


def flow_loss(
    pred_v: torch.Tensor,
    target_v: torch.Tensor,
    x_sigma: torch.Tensor,
    sigma,
    mode: str = "standard",
    params: dict | None = None,
    *,
    latent_rgb_factors: torch.Tensor | None = None,
    latent_rgb_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample training loss [B] for ``mode`` (see the module doc for every term).

    ``pred_v``/``target_v``: model and target velocities (v = eps - x0), ``x_sigma``: the noisy model
    input, ``sigma``: ComfyUI sigma per sample (1 = noise; a number or [B]). Computed in float32 (or
    float64). Weight and reduce with weighting.min_snr_weight and common.reduce_loss.
    ``latent_rgb_factors``/``latent_rgb_bias`` choose the style modes' luminance/colour basis (style.py);
    modes without style terms ignore them. Curvature (curvature.py) needs extra model evaluations and
    is added by the trainer; AC-RF added it after the Min-SNR weighting.
    """
    resolved = resolve_loss_params(mode, params)
    check_same_shape(pred_v=pred_v, target_v=target_v, x_sigma=x_sigma)
    dtype = compute_dtype(pred_v, target_v, x_sigma)
    pred_v, target_v, x_sigma = pred_v.to(dtype), target_v.to(dtype), x_sigma.to(dtype)
    sigma = per_sample_sigma(sigma, pred_v.shape[0], like=pred_v)

    loss = hybrid_flow_loss(
        pred_v,
        target_v,
        lambda_mse=resolved["lambda_mse"],
        lambda_l1=resolved["lambda_l1"],
        lambda_cos=resolved["lambda_cos"],
    )
    uses_frequency = "lambda_freq" in resolved and resolved["lambda_freq"] > 0
    uses_style = "lambda_style" in resolved and resolved["lambda_style"] > 0
    if not (resolved["lambda_fft"] or uses_frequency or uses_style):
        return loss

    if pred_v.ndim != 4:
        raise ValueError(
            f"loss mode {mode!r} needs image latents [B, C, H, W], got shape {tuple(pred_v.shape)}"
        )
    pred_x0 = denoised_from_velocity(x_sigma, pred_v, sigma)
    target_x0 = denoised_from_velocity(x_sigma, target_v, sigma)
    if resolved["lambda_fft"]:
        loss = loss + resolved["lambda_fft"] * fft_highpass_loss(pred_x0, target_x0)
    if uses_frequency:
        loss = loss + resolved["lambda_freq"] * frequency_band_loss(
            pred_x0,
            target_x0,
            alpha_hf=resolved["alpha_hf"],
            beta_lf=resolved["beta_lf"],
            downsample_factor=resolved["downsample_factor"],
        )
    if uses_style:
        loss = loss + resolved["lambda_style"] * style_structure_loss(
            pred_x0,
            target_x0,
            lambda_struct=resolved["lambda_struct"],
            lambda_light=resolved["lambda_light"],
            lambda_color=resolved["lambda_color"],
            lambda_tex=resolved["lambda_tex"],
            downsample_factor=resolved["downsample_factor"],
            ssim_data_range=resolved["ssim_data_range"],
            latent_rgb_factors=latent_rgb_factors,
            latent_rgb_bias=latent_rgb_bias,
        )
    return loss
