"""Apply a flow model's own time shift to our schedules, reading it from the model's model_sampling.

Time convention: ComfyUI sigma (1 = noise, 0 = data; Lumina t = 1 - sigma; diffusers timestep =
1000 sigma). Our schedules (samplers/schedules.py) are built on the unit sigma interval; a flow
model's ``model_sampling`` says how that interval is warped for it:

* ``ModelSamplingDiscreteFlow`` (Lumina-2, Z-Image, SD3, AuraFlow, Wan, ... and the subclasses the
  ModelSamplingSD3 / ModelSamplingAuraFlow nodes patch in): the rational shift
  ``sigma' = shift sigma / (1 + (shift - 1) sigma)`` with ``model_sampling.shift`` — the same value
  its 1000-entry ``sigmas`` table was filled with (``sigmas[k] = shift((k + 1) / 1000)``). We pass
  that shift to the pure schedule functions, so the nodes, the stock-list handlers and the web preview
  compute identical numbers.
* ``ModelSamplingFlux`` (Flux): an exponential shift with ``mu = model_sampling.shift``; we apply the
  model's own warp, ``model_sampling.percent_to_sigma(1 - sigma)``, value by value.

Any other model_sampling (eps / v-prediction models, whose sigmas are not in [0, 1]) is refused with
a ValueError naming the input: these schedules are defined for flow-matching models only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from comfy.model_sampling import ModelSamplingDiscreteFlow, ModelSamplingFlux


def describe_shift(model_sampling) -> str:
    """A short human description of the model's time shift, e.g. ``'shift 6 (model)'``."""
    if isinstance(model_sampling, ModelSamplingDiscreteFlow):
        return f"shift {float(model_sampling.shift):g} (model)"
    if isinstance(model_sampling, ModelSamplingFlux):
        return f"Flux shift mu {float(model_sampling.shift):g} (model)"
    return type(model_sampling).__name__


def _kind(model_sampling) -> str:
    # ComfyUI builds model_sampling as class ModelSampling(<sampling>, <prediction>): name the parents.
    bases = type(model_sampling).__bases__
    names = [base.__name__ for base in bases if base is not object]
    return " + ".join(names) or type(model_sampling).__name__


def _warp_like_model(sigmas: torch.Tensor, model_sampling) -> torch.Tensor:
    # percent_to_sigma pins 1 -> 1 and 0 -> 0 exactly and applies the model's own shift in between.
    warped = [float(model_sampling.percent_to_sigma(1.0 - float(s))) for s in sigmas.tolist()]
    return torch.tensor(warped, dtype=torch.float32)


def sigmas_for_model(
    model_sampling, build: Callable[[float | None], torch.Tensor], input_name: str = "model"
) -> torch.Tensor:
    """ComfyUI SIGMAS for a flow model: ``build(shift)`` with the model's shift applied.

    ``build(shift)`` returns an unshifted schedule when ``shift`` is None and the rationally shifted
    one otherwise (ComfyUI sigma, 1 = noise). Raises ValueError naming ``input_name`` for models that
    are not flow-matching, or when the model's warp makes the schedule stop descending.
    """
    if isinstance(model_sampling, ModelSamplingDiscreteFlow):
        return build(float(model_sampling.shift))
    if isinstance(model_sampling, ModelSamplingFlux):
        sigmas = _warp_like_model(build(None), model_sampling)
        if sigmas.numel() > 1 and not bool((sigmas[1:] < sigmas[:-1]).all()):
            raise ValueError(
                f"{input_name}: the model's time shift collapses neighbouring sigmas of this schedule "
                "(not strictly descending in float32); use fewer steps or a gentler slope"
            )
        return sigmas
    raise ValueError(
        f"{input_name}: this schedule is for flow-matching models (model_sampling with sigma 1 = noise "
        f"-> 0 = data, e.g. Lumina-2, Z-Image, SD3, Flux, Wan); got {_kind(model_sampling)}"
    )
