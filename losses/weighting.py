"""Per-sample loss weights from the noise level: Min-SNR-gamma in the form each loss space needs.

Time convention: ComfyUI sigma (1 = noise, 0 = data); Lumina t = 1 - sigma; diffusers timestep =
1000 sigma. Rectified-flow interpolation x_sigma = (1 - sigma) x0 + sigma eps, so the signal scale is
alpha = 1 - sigma, the noise scale is sigma and

    SNR(sigma) = alpha^2 / sigma^2 = ((1 - sigma) / sigma)^2.

Min-SNR-gamma (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", ICCV
2023) weights the *x0-space* loss ||x̂0 - x0||^2 by min(SNR, gamma). To weight a loss measured in
another space, convert it to x0-space error first:

  * velocity v = eps - x0 (this package):  x0 = x_sigma - sigma v, so ||x̂0 - x0||^2 = sigma^2 ||v̂ - v||^2
        w_v = sigma^2 min(SNR, gamma) = min(SNR, gamma) / (1 + sqrt(SNR))^2 = min((1 - sigma)^2, gamma sigma^2)
    (sqrt(SNR) = (1 - sigma)/sigma, hence 1 + sqrt(SNR) = 1/sigma). This is the exact rectified-flow
    weight; it peaks at sigma = 1/(1 + sqrt(gamma)) with value gamma/(1 + sqrt(gamma))^2 (0.477 at
    gamma 5) and goes to 0 at both ends, like the paper's own v-prediction weight does.
  * epsilon:  eps = (x_sigma - alpha x0)/sigma, so ||ε̂ - eps||^2 = SNR ||x̂0 - x0||^2:  w = min(SNR, gamma)/SNR
  * VP v-prediction (alpha^2 + sigma^2 = 1):  ||v̂ - v||^2 = (1 + SNR) ||x̂0 - x0||^2:  w = min(SNR, gamma)/(SNR + 1).
    AC-RF (snr_utils.compute_snr_weights) applies this VP formula to rectified flow, with a floor of
    0.1; it is offered under that name for reproducing AC-RF, not because it is right for RF.

All forms are written without division by zero so sigma = 0 and sigma = 1 are exact.
"""

from __future__ import annotations

import torch

MIN_SNR_FORMS = ("rectified_flow_velocity", "vp_v_prediction", "epsilon", "x0")


def _as_sigma(sigma) -> torch.Tensor:
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.float32)
    if not torch.isfinite(sigma).all() or (sigma < 0).any() or (sigma > 1).any():
        raise ValueError(f"sigma must lie in [0, 1] (ComfyUI sigma, 1 = noise), got {sigma.tolist()}")
    return sigma


def snr_from_sigma(sigma) -> torch.Tensor:
    """SNR = ((1 - sigma) / sigma)^2 for ComfyUI sigma (1 = noise); inf at sigma = 0, 0 at sigma = 1."""
    sigma = _as_sigma(sigma)
    return (1 - sigma).square() / sigma.square()


def min_snr_weight(
    sigma, snr_gamma: float = 5.0, *, form: str = "rectified_flow_velocity", floor: float = 0.0
):
    """Min-SNR-gamma weight per sample for ComfyUI sigma (1 = noise), same shape as ``sigma``.

    ``form`` names the space the weighted loss is measured in (derivations in the module doc):
      * ``"rectified_flow_velocity"`` (default, for this package's velocity losses):
        min((1 - sigma)^2, gamma sigma^2) = sigma^2 min(SNR, gamma)
      * ``"vp_v_prediction"``: min(SNR, gamma) / (SNR + 1)  (what AC-RF uses, with floor 0.1)
      * ``"epsilon"``: min(SNR, gamma) / SNR = min(1, gamma sigma^2 / (1 - sigma)^2)
      * ``"x0"``: min(SNR, gamma)
    The result is max(w, floor). ``snr_gamma`` = 5 is the paper's and AC-RF's default.
    """
    if form not in MIN_SNR_FORMS:
        raise ValueError(f"form must be one of {MIN_SNR_FORMS}, got {form!r}")
    if isinstance(snr_gamma, bool) or not float(snr_gamma) > 0:
        raise ValueError(f"snr_gamma must be > 0, got {snr_gamma!r}")
    if not float(floor) >= 0:
        raise ValueError(f"floor must be >= 0, got {floor!r}")
    sigma = _as_sigma(sigma)
    gamma = float(snr_gamma)
    signal_sq = (1 - sigma).square()  # alpha^2
    noise_sq = sigma.square()  # sigma^2; SNR = signal_sq / noise_sq
    capped = torch.minimum(signal_sq, gamma * noise_sq)  # sigma^2 * min(SNR, gamma)
    if form == "rectified_flow_velocity":
        weight = capped
    elif form == "vp_v_prediction":
        weight = capped / (signal_sq + noise_sq)
    elif form == "epsilon":
        weight = torch.where(signal_sq > 0, capped / signal_sq.clamp_min(torch.finfo(sigma.dtype).tiny), 1.0)
    else:
        weight = torch.where(noise_sq > 0, capped / noise_sq.clamp_min(torch.finfo(sigma.dtype).tiny), gamma)
    return weight.clamp_min(float(floor))
