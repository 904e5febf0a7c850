"""Pure-torch losses, loss weighting and timestep sampling for the AC-RF LoRA trainer (no ComfyUI import).

Time convention everywhere: ComfyUI sigma (1 = noise, 0 = data), x_sigma = (1 - sigma) x0 + sigma eps,
target velocity v = eps - x0; Lumina t = 1 - sigma; diffusers timestep = 1000 sigma.
"""

from .common import reduce_loss
from .curvature import curvature_neighbour_sigmas, curvature_penalty, default_curvature_step
from .modes import LOSS_MODES, flow_loss, loss_mode_defaults, resolve_loss_params
from .replay import NO_ANCHOR, HardSampleReplay
from .timesteps import (
    TIMESTEP_METHODS,
    sample_anchor_sigmas,
    sample_shifted_sigmoid_sigmas,
    sample_training_sigmas,
    sample_uniform_sigmas,
    training_anchor_sigmas,
)
from .weighting import MIN_SNR_FORMS, min_snr_weight, snr_from_sigma

__all__ = [
    "LOSS_MODES",
    "MIN_SNR_FORMS",
    "NO_ANCHOR",
    "TIMESTEP_METHODS",
    "HardSampleReplay",
    "curvature_neighbour_sigmas",
    "curvature_penalty",
    "default_curvature_step",
    "flow_loss",
    "loss_mode_defaults",
    "min_snr_weight",
    "reduce_loss",
    "resolve_loss_params",
    "sample_anchor_sigmas",
    "sample_shifted_sigmoid_sigmas",
    "sample_training_sigmas",
    "sample_uniform_sigmas",
    "snr_from_sigma",
    "training_anchor_sigmas",
]
