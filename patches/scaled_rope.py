"""Scaled RoPE for NextDiT (Lumina-2, Z-Image) as an object patch of ``diffusion_model.rope_embedder``.

NextDiT builds its rotary tables once per forward with ``self.rope_embedder(ids)`` (ComfyUI's
``EmbedND``: one ``comfy.ldm.flux.math.rope`` call per axis). The patch swaps that module on a clone
for :class:`ScaledRopeEmbedder`, which makes the same ``rope`` calls -- with positions divided by s
(PI) and/or another theta (NTK-style) per ``models.rope_scaling`` -- for the two image axes when the
image extends beyond the training length. At or below the training resolution every call is the
original one, so the model output is bit-identical. The caption axis is never scaled.

The scale per image axis is ``(largest position + 1) / L``, read from the position ids NextDiT
actually uses (so ComfyUI's ``ScaleROPE`` / ``rope_options`` compose with it). ``time_aware`` needs
the current time: a DIFFUSION_MODEL wrapper on the same clone publishes Lumina ``t = 1 - sigma``
(per sample) in a context variable for the duration of each forward.
"""

from __future__ import annotations

import contextvars
import logging

import torch

from ..samplers.rope_scaling import MODES, rope_plan

WRAPPER_KEY = "lumina_turbo_scaled_rope"
IMAGE_AXES = (1, 2)
_lumina_t: contextvars.ContextVar = contextvars.ContextVar("lumina_turbo_rope_t", default=None)
log = logging.getLogger(__name__)


class ScaledRopeEmbedder(torch.nn.Module):
    """Drop-in for ComfyUI's ``EmbedND`` (no parameters) with scaled image-axis frequencies."""

    def __init__(self, dim: int, theta: float, axes_dim, mode: str, train_tokens: float):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.dim, self.theta, self.axes_dim = dim, theta, list(axes_dim)
        self.mode, self.train_tokens = mode, float(train_tokens)
        self._warned = False

    def axis_scale(self, positions: torch.Tensor) -> float:
        return (float(positions.max()) + 1.0) / self.train_tokens

    def _times(self, batch):
        t = _lumina_t.get()
        if t is None:
            if not self._warned:
                self._warned = True
                log.warning("LTScaledRoPE: time_aware used outside a sampled forward; using t = 0 (PI-like)")
            return [0.0] * batch
        t = t.flatten().tolist()
        return t if len(t) == batch else [t[0]] * batch

    def _scaled_axis(self, pos, axis_dim, scale, t):
        from comfy.ldm.flux.math import rope

        base, use_pi = rope_plan(self.mode, axis_dim, self.theta, scale, self.train_tokens, t)
        if bool(use_pi.all()):
            return rope(pos / scale, axis_dim, self.theta)
        ntk = rope(pos, axis_dim, base)
        if not bool(use_pi.any()):
            return ntk
        pi = rope(pos / scale, axis_dim, self.theta)
        return torch.where(use_pi.to(pi.device).view(1, 1, -1, 1, 1), pi, ntk)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from comfy.ldm.flux.math import rope

        parts = []
        for axis in range(ids.shape[-1]):
            pos, axis_dim = ids[..., axis], self.axes_dim[axis]
            scale = self.axis_scale(pos) if axis in IMAGE_AXES and self.mode != "none" else 1.0
            if scale <= 1.0:
                parts.append(rope(pos, axis_dim, self.theta))
            elif self.mode != "time_aware":
                parts.append(self._scaled_axis(pos, axis_dim, scale, None))
            else:
                times = self._times(pos.shape[0])
                if all(t == times[0] for t in times):
                    parts.append(self._scaled_axis(pos, axis_dim, scale, times[0]))
                else:  # per-sample time: one table per sample
                    parts.append(
                        torch.cat(
                            [
                                self._scaled_axis(pos[i : i + 1], axis_dim, scale, t)
                                for i, t in enumerate(times)
                            ],
                            dim=0,
                        )
                    )
        return torch.cat(parts, dim=-3).unsqueeze(1)


def publish_time_wrapper(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: Lumina t = 1 - sigma (NextDiT's ``timesteps`` is sigma) for this forward."""
    timesteps = args[1] if len(args) > 1 else kwargs.get("timesteps")
    token = _lumina_t.set(1.0 - timesteps.detach().float().cpu() if torch.is_tensor(timesteps) else None)
    try:
        return executor(*args, **kwargs)
    finally:
        _lumina_t.reset(token)


def latent_downscale(model_patcher) -> int:
    fmt = getattr(model_patcher.model, "latent_format", None)
    return int(getattr(fmt, "spacial_downscale_ratio", 8) or 8)


def apply_scaled_rope(model_patcher, mode: str, train_resolution: int):
    """A clone of ``model_patcher`` whose NextDiT scales RoPE beyond ``train_resolution`` pixels."""
    import comfy.patcher_extension

    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    patched = model_patcher.clone()
    if mode == "none":
        return patched
    original = patched.get_model_object("diffusion_model.rope_embedder")
    for attr in ("dim", "theta", "axes_dim"):
        if not hasattr(original, attr):
            raise ValueError(
                "model: expected a Lumina-2 / Z-Image (NextDiT) model with a 3-axis RoPE embedder"
            )
    patch = patched.get_model_object("diffusion_model.patch_size")
    train_tokens = train_resolution / (latent_downscale(patched) * patch)
    patched.add_object_patch(
        "diffusion_model.rope_embedder",
        ScaledRopeEmbedder(original.dim, original.theta, original.axes_dim, mode, train_tokens),
    )
    wrappers = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    patched.remove_wrappers_with_key(wrappers, WRAPPER_KEY)
    if mode == "time_aware":
        patched.add_wrapper_with_key(wrappers, WRAPPER_KEY, publish_time_wrapper)
    return patched
