"""Optimizers and learning-rate schedules (LambdaLR, so their state_dict resumes exactly).

Schedules (``step`` counts optimizer steps, 0-based; during ``warmup`` the factor is
(step + 1) / (warmup + 1), so no step is wasted at learning rate 0):
  constant / constant_with_warmup: 1 after warmup (``constant`` also honours a warmup)
  linear:  1 -> 0 over the steps after warmup
  cosine:  0.5 (1 + cos(pi p)), p = progress after warmup in [0, 1]
  cosine_with_restarts: the cosine restarted ``num_cycles`` times (the diffusers definition)
"""

from __future__ import annotations

import math

import torch


class OptimizerUnavailable(RuntimeError):
    pass


# Optimizers that need a package of their own: (module, how to get it).
_PACKAGES = {
    "AdamW8bit": ("bitsandbytes", "pip install bitsandbytes, on a CUDA device"),
    "Prodigy": ("prodigyopt", "pip install prodigyopt"),
}


def missing_package(name: str) -> str | None:
    """Why optimizer ``name`` cannot be used here (its package is not installed), or None; checked
    before a run starts, so a missing package is reported before the data set is encoded."""
    import importlib.util

    if name not in _PACKAGES:
        return None
    module, how = _PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        return f"optimizer: {name} needs the {module} package ({how}); it is not installed. Use AdamW."
    return None


def make_optimizer(name: str, params, *, lr: float, weight_decay: float):
    params = list(params)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "AdamW8bit":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
        except Exception as exc:
            raise OptimizerUnavailable(
                f"optimizer_type: AdamW8bit needs a working bitsandbytes (pip install bitsandbytes, on a CUDA "
                f"device); it is not usable here ({type(exc).__name__}: {exc}). Use AdamW."
            ) from exc
    if name == "Adafactor":
        try:
            from transformers.optimization import Adafactor
        except ImportError as exc:
            raise OptimizerUnavailable("optimizer_type: Adafactor needs the transformers package") from exc
        return Adafactor(
            params,
            lr=lr,
            weight_decay=weight_decay,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
        )
    if name == "Prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as exc:
            raise OptimizerUnavailable(
                "optimizer_type: Prodigy needs the prodigyopt package (pip install prodigyopt); it is not installed. "
                "Use AdamW."
            ) from exc
        return Prodigy(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer_type: unknown optimizer {name!r}")


def lr_factor(
    step: int, *, schedule: str, total_steps: int, warmup_steps: int = 0, num_cycles: int = 1
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule in ("constant", "constant_with_warmup"):
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))
    raise ValueError(f"lr_scheduler: unknown schedule {schedule!r}")


def make_scheduler(optimizer, *, schedule: str, total_steps: int, warmup_steps: int, num_cycles: int):
    def factor(step):
        return lr_factor(
            step, schedule=schedule, total_steps=total_steps, warmup_steps=warmup_steps, num_cycles=num_cycles
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
