"""Adds ``lt_sigmoid``, ``lt_anchor`` (schedulers) and ``flow_midpoint`` (sampler) to ComfyUI's stock lists.

This is a documented, deliberate global registry addition — the only way the stock KSampler,
KSamplerAdvanced, BasicScheduler and KSamplerSelect can offer them (ComfyUI 0.3.75):

* schedulers: ``comfy.samplers.SCHEDULER_HANDLERS[name] = SchedulerHandler(fn)`` (``calculate_sigmas``
  calls ``fn(model_sampling, steps)``) and the name appended to ``comfy.samplers.SCHEDULER_NAMES``,
  which is the same list object as ``KSampler.SCHEDULERS`` that the KSampler node's INPUT_TYPES and
  prompt validation read live.
* sampler: ``comfy.samplers.ksampler(name)`` looks the function up as
  ``getattr(comfy.k_diffusion.sampling, "sample_" + name)``, so we set ``sample_flow_midpoint`` there
  and append the name to ``KSAMPLER_NAMES`` and ``SAMPLER_NAMES`` (``SAMPLER_NAMES`` is a separate
  list object, ``KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]``, and is ``KSampler.SAMPLERS``).

Nothing existing is changed: names are only appended, once (a reloaded pack finds its own entries
and refreshes the functions without duplicating names), and a name some other pack already owns is
left alone with a warning. Called once from the pack's ``comfy_entrypoint``.
"""

from __future__ import annotations

import logging

import comfy.samplers
from comfy.k_diffusion import sampling as k_diffusion_sampling

from ..samplers.flow_solvers import sample_flow_midpoint
from ..samplers.schedules import anchor_sigmas, sigmoid_sigmas
from .sampling_shift import sigmas_for_model

SCHEDULER_NAMES = ("lt_sigmoid", "lt_anchor")
SAMPLER_NAMES = ("flow_midpoint",)
_OUR_MODULES = ("samplers.flow_solvers", "patches.stock_lists")


def lt_sigmoid_scheduler(model_sampling, steps: int):
    """Stock handler: the sigmoid schedule with its default slope/center and the model's own shift.

    ComfyUI sigma (1 = noise). The stock lists cannot carry parameters; use LTSigmoidScheduler for
    other slopes/centers.
    """
    return sigmas_for_model(
        model_sampling, lambda shift: sigmoid_sigmas(steps, shift=shift), "scheduler lt_sigmoid"
    )


def lt_anchor_scheduler(model_sampling, steps: int):
    """Stock handler: Z-Image anchors ``shift(linspace(1, 0, steps + 1))`` with the model's own shift.

    ComfyUI sigma (1 = noise). For Z-Image-Turbo (shift 3) at 8 steps these are exactly its trained
    sigmas; use LTAnchorScheduler for another shift or the diffusers convention.
    """
    return sigmas_for_model(
        model_sampling,
        lambda shift: anchor_sigmas(steps, 1.0 if shift is None else shift),
        "scheduler lt_anchor",
    )


def _is_ours(function) -> bool:
    return getattr(function, "__module__", "").endswith(_OUR_MODULES)


def _append_once(name: str, *lists: list) -> None:
    seen = set()
    for names in lists:
        if id(names) in seen:
            continue  # e.g. SCHEDULER_NAMES is KSampler.SCHEDULERS
        seen.add(id(names))
        if name not in names:
            names.append(name)


def register_stock_names() -> None:
    """Put our scheduler and sampler names in ComfyUI's stock lists (idempotent)."""
    handlers = {"lt_sigmoid": lt_sigmoid_scheduler, "lt_anchor": lt_anchor_scheduler}
    for name, handler in handlers.items():
        existing = comfy.samplers.SCHEDULER_HANDLERS.get(name)
        if existing is not None and not _is_ours(existing.handler):
            logging.warning(
                "Lumina Turbo: scheduler %r is already registered by %s; not replacing it",
                name,
                getattr(existing.handler, "__module__", "?"),
            )
            continue
        comfy.samplers.SCHEDULER_HANDLERS[name] = comfy.samplers.SchedulerHandler(handler)
        _append_once(name, comfy.samplers.SCHEDULER_NAMES, comfy.samplers.KSampler.SCHEDULERS)

    samplers = {"flow_midpoint": sample_flow_midpoint}
    for name, function in samplers.items():
        attribute = f"sample_{name}"
        existing = getattr(k_diffusion_sampling, attribute, None)
        if existing is not None and not _is_ours(existing):
            logging.warning(
                "Lumina Turbo: sampler %r is already registered by %s; not replacing it",
                name,
                getattr(existing, "__module__", "?"),
            )
            continue
        setattr(k_diffusion_sampling, attribute, function)
        _append_once(
            name,
            comfy.samplers.KSAMPLER_NAMES,
            comfy.samplers.SAMPLER_NAMES,
            comfy.samplers.KSampler.SAMPLERS,
        )
