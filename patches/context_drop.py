"""Time-Aware Context Drop for NextDiT (Lumina-Image-2.0, Z-Image) through ComfyUI's extension points.

Lumina-Next (Zhuo et al. 2024, arXiv 2406.18583, "Time-Aware Context Drop"): in self-attention the
keys and values of the image tokens are average-pooled over the 2-D token grid (r x r windows,
stride r), while every query is kept, so the output keeps its full resolution and the attention
cost falls by about r^2. Pooling happens after RoPE (as in the only released code,
Lumina-T2X ``visual_anagrams/models/nextdit.py``), so a pooled key is the mean of r^2 rotated keys.
The paper drops in every layer at the noise end and in none at the data end; the layer schedule in
between is not published, so here a strength s(sigma) picks that fraction of the selected layers,
spread evenly over depth. s falls linearly from 1 at sigma 1 to 0 at ``DEFAULT_END_SIGMA`` = 0.3, not
0: samplers never evaluate sigma 0, and with an end of 0 the last step of Lumina-2's 30-step shift-6
schedule (sigma 0.17) would still pool in 4 of its 26 layers. 0.3 is the smallest round value at which
the last step of the usual schedules is exact (Lumina-2 20/30/50 steps at shift 6: last sigma 0.24,
0.17, 0.11; Z-Image-Turbo 8 steps at shift 3: 0.30).

Time convention: ComfyUI sigma (1 = noise, 0 = data); Lumina t = 1 - sigma. NextDiT receives sigma
itself as ``timesteps`` (Lumina-2 / Z-Image use multiplier 1).

How it hooks in (no copied forward, nothing global):

* a ``WrappersMP.DIFFUSION_MODEL`` wrapper on the patched clone sees each forward's latent (grid
  size), caption length and sigma, decides which main layers drop, and -- only when some do --
  puts a per-forward ``optimized_attention_override`` into a copy of ``transformer_options``;
* ComfyUI's ``wrap_attn`` calls that override for every attention of NextDiT. It counts the calls
  (context refiners, noise refiners, then the main layers, as ``NextDiT._forward`` runs them) and
  checks each call's sequence length against the layout it expects. Caption tokens and pad tokens
  are never pooled; an attention mask is kept when it is constant inside each pooling window.
  Anything unexpected falls back to exact attention for the rest of the forward, logged once.

With the strength at 0 (sigma <= end_sigma by default) the wrapper calls the model untouched, so the
output is bit-identical to the unpatched model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

WRAPPER_KEY = "lumina_turbo_context_drop"
DEFAULT_END_SIGMA = 0.3  # see the module docstring
log = logging.getLogger(__name__)
_logged: set[str] = set()


def log_once(reason: str, message: str):
    """Warn once per process for each fallback ``reason``; ``message`` (which may name shapes that
    change from forward to forward) is only the text of the first warning."""
    if reason not in _logged:
        _logged.add(reason)
        log.warning("LTContextDrop: %s (logged once)", message)


@dataclass(frozen=True)
class ContextDropSettings:
    """kernel: pooling window r (1 = off); full strength at sigma >= start_sigma, none at
    sigma <= end_sigma, linear in between; layers: main-layer indices that may drop (None = all)."""

    kernel: int = 2
    start_sigma: float = 1.0
    end_sigma: float = DEFAULT_END_SIGMA
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.kernel < 1:
            raise ValueError(f"kernel: expected an integer >= 1, got {self.kernel}")
        if not (0.0 <= self.end_sigma < self.start_sigma <= 1.0):
            raise ValueError(
                f"start_sigma/end_sigma: expected 0 <= end < start <= 1, got "
                f"start {self.start_sigma}, end {self.end_sigma}"
            )


def drop_strength(sigma: float, start_sigma: float = 1.0, end_sigma: float = DEFAULT_END_SIGMA) -> float:
    """Fraction of the selected layers that drop at ComfyUI ``sigma`` (1 = noise): 1 at or above
    ``start_sigma``, 0 at or below ``end_sigma``, linear in between."""
    return min(1.0, max(0.0, (sigma - end_sigma) / (start_sigma - end_sigma)))


def dropping_layers(strength: float, candidates: list[int]) -> frozenset[int]:
    """``round(strength * n)`` of the ``n`` candidate layers, spread evenly over depth."""
    count = int(math.floor(strength * len(candidates) + 0.5))
    if count <= 0:
        return frozenset()
    return frozenset(candidates[(i * len(candidates)) // count] for i in range(count))


MAX_LAYER_INDEX = 999  # deeper than any NextDiT (Lumina-2: 26 layers, Z-Image: 30); bounds '0-20000000'


def parse_layers(text: str) -> tuple[int, ...] | None:
    """``"all"`` -> None; ``"0-5, 10"`` -> (0, 1, 2, 3, 4, 5, 10). Raises ValueError naming the input.

    Indices above MAX_LAYER_INDEX are refused before any range is built; :func:`check_layers` then
    holds them to the model's real depth."""
    text = text.strip().lower()
    if text in ("", "all"):
        return None
    out = set()
    for part in text.split(","):
        part = part.strip()
        try:
            lo, hi = (int(x) for x in part.split("-", 1)) if "-" in part else (int(part),) * 2
            if lo > hi or lo < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"layers: expected 'all' or indices like '0-5, 10', got {text!r}") from None
        if hi > MAX_LAYER_INDEX:  # before the range is built
            raise ValueError(f"layers: indices go up to {MAX_LAYER_INDEX} at most, got {text!r}")
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))


def check_layers(layers: tuple[int, ...] | None, depth: int) -> None:
    """ValueError naming the input when an index is not one of the model's ``depth`` main layers."""
    if layers and max(layers) >= depth:
        raise ValueError(
            f"layers: the model has {depth} main layers (0-{depth - 1}), got index {max(layers)}"
        )


def pool_grid(tokens: torch.Tensor, grid: tuple[int, int], kernel: int) -> torch.Tensor:
    """Average-pool (B, heads, h*w, d) row-major grid tokens over r x r windows -> (B, heads, h'*w', d).

    Edge windows that the grid does not fill are averaged over the tokens they hold. Summing the r^2
    strided views is ~10x faster on CPU than ``avg_pool2d`` on NextDiT's (tokens, heads) layout, which
    would need a channel-first copy; half-precision inputs are summed in float32.
    """
    b, heads, _, d = tokens.shape
    h, w = grid
    x = tokens.reshape(b, heads, h, w, d)  # a view for NextDiT's keys/values
    pad_h, pad_w = (-h) % kernel, (-w) % kernel
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    low_precision = tokens.dtype in (torch.float16, torch.bfloat16)
    total = None
    for i in range(kernel):
        for j in range(kernel):
            part = x[:, :, i::kernel, j::kernel]
            if total is None:
                total = part.to(torch.float32, copy=True) if low_precision else part.clone()
            else:
                total += part
    if pad_h or pad_w:
        rows = torch.full((total.shape[2], 1, 1), float(kernel), device=total.device)
        cols = torch.full((total.shape[3], 1), float(kernel), device=total.device)
        rows[-1] -= pad_h
        cols[-1] -= pad_w
        total /= (rows * cols).to(total.dtype)
    else:
        total /= kernel * kernel
    return total.to(tokens.dtype).reshape(b, heads, -1, d)


def _pool_mask(mask, cap, grid, kernel):
    """Pool the key axis of an attention mask like the keys; None when a window is not constant."""
    h, w = grid
    n = h * w
    lead = mask.shape[:-1]
    image = mask[..., cap : cap + n].to(torch.float32).reshape(-1, 1, h, w)
    high = F.max_pool2d(image, kernel, stride=kernel, ceil_mode=True)
    low = -F.max_pool2d(-image, kernel, stride=kernel, ceil_mode=True)
    if not torch.equal(high, low):
        return None
    pooled = high.reshape(*lead, -1).to(mask.dtype)
    return torch.cat((mask[..., :cap], pooled, mask[..., cap + n :]), dim=-1)


class ForwardPlan:
    """Layout of one NextDiT forward and the layers that drop in it; its ``override`` is the
    ``optimized_attention_override`` for that forward only (state lives here, not on the model)."""

    def __init__(self, kernel, drop, n_context, n_noise, cap_len, img_len, grid, previous=None):
        self.kernel, self.drop, self.previous = kernel, drop, previous
        self.n_context, self.n_noise = n_context, n_noise
        self.cap_len, self.img_len, self.grid = cap_len, img_len, grid
        self.calls = 0
        self.failed = False

    def _expected_len(self, index):
        if index < self.n_context:
            return self.cap_len
        if index < self.n_context + self.n_noise:
            return self.img_len
        return self.cap_len + self.img_len

    def _exact(self, func, args, kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def override(self, func, *args, **kwargs):
        index = self.calls
        self.calls += 1
        if self.failed or len(args) < 3:
            return self._exact(func, args, kwargs)
        q, k, v = args[:3]
        if q.ndim != 4 or not kwargs.get("skip_reshape", False) or q.shape[2] != self._expected_len(index):
            self.failed = True
            log_once(
                "layout",
                f"attention call {index} does not have the NextDiT layout expected "
                f"(query {tuple(q.shape)}); exact attention for the rest of this forward",
            )
            return self._exact(func, args, kwargs)
        layer = index - self.n_context - self.n_noise
        if layer not in self.drop:
            return self._exact(func, args, kwargs)
        if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
            self.failed = True
            log_once("kv_length", "keys/values differ in length from queries; exact attention")
            return self._exact(func, args, kwargs)
        cap, n = self.cap_len, self.grid[0] * self.grid[1]
        mask = kwargs.get("mask", args[4] if len(args) > 4 else None)
        if mask is not None:
            if mask.shape[-1] != k.shape[2]:
                log_once(
                    "mask_shape",
                    f"an attention mask of shape {tuple(mask.shape)} does not match the keys; exact attention",
                )
                return self._exact(func, args, kwargs)
            mask = _pool_mask(mask, cap, self.grid, self.kernel)
            if mask is None:
                log_once(
                    "mask_window",
                    "an attention mask varies inside a pooling window; exact attention where it does",
                )
                return self._exact(func, args, kwargs)

        def drop(t):
            return torch.cat(
                (
                    t[:, :, :cap],
                    pool_grid(t[:, :, cap : cap + n], self.grid, self.kernel),
                    t[:, :, cap + n :],
                ),
                dim=2,
            )

        new_args = [q, drop(k), drop(v), *args[3:]]
        new_kwargs = dict(kwargs)
        if len(args) > 4:  # NextDiT passes the mask positionally
            new_args[4] = mask
        else:
            new_kwargs["mask"] = mask
        return self._exact(func, tuple(new_args), new_kwargs)


def _padded(length, multiple):
    return length if not multiple else length + (-length) % multiple


class ContextDropWrapper:
    """The DIFFUSION_MODEL wrapper (``fn(executor, x, timesteps, context, num_tokens, ...)``)."""

    def __init__(self, settings: ContextDropSettings):
        self.settings = settings

    def plan(self, dm, x, timesteps, context, previous):
        s = self.settings
        sigma = float(timesteps.min()) if torch.is_tensor(timesteps) else float(timesteps)
        n_layers = len(dm.layers)
        candidates = [i for i in range(n_layers) if s.layers is None or i in s.layers]
        drop = dropping_layers(drop_strength(sigma, s.start_sigma, s.end_sigma), candidates)
        if not drop or s.kernel <= 1:
            return None
        if not torch.is_tensor(x) or x.ndim != 4 or context is None:
            log_once("input", "the model input is not a (B, C, H, W) latent with a caption; exact attention")
            return None
        patch = dm.patch_size
        grid = (-(-x.shape[-2] // patch), -(-x.shape[-1] // patch))
        multiple = getattr(dm, "pad_tokens_multiple", None)
        cap_len = _padded(context.shape[1], multiple)
        img_len = _padded(grid[0] * grid[1], multiple)
        return ForwardPlan(
            s.kernel, drop, len(dm.context_refiner), len(dm.noise_refiner), cap_len, img_len, grid, previous
        )

    def __call__(self, executor, *args, **kwargs):
        dm = executor.class_obj
        x, timesteps, context = (list(args) + [None] * 3)[:3]
        options = kwargs.get("transformer_options") or {}
        plan = None
        try:
            plan = self.plan(dm, x, timesteps, context, options.get("optimized_attention_override"))
        except AttributeError as exc:  # not a NextDiT
            log_once("not_nextdit", f"the model is not a NextDiT ({exc}); exact attention")
        if plan is None:
            return executor(*args, **kwargs)
        options = dict(options)
        options["optimized_attention_override"] = plan.override
        return executor(*args, **{**kwargs, "transformer_options": options})


def apply_context_drop(model_patcher, settings: ContextDropSettings):
    """A clone of ``model_patcher`` with Time-Aware Context Drop (kernel 1: a plain clone)."""
    import comfy.patcher_extension

    patched = model_patcher.clone()
    if settings.kernel > 1:
        patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
        patched.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, ContextDropWrapper(settings)
        )
    return patched
