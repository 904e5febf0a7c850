"""A linear layer over a frozen weight that is stored in another form than the one it computes with.

ComfyUI casts a stored weight (fp8, bf16 on a fp32 compute device, or a block-swapped weight on the
offload device) to the compute dtype and device each time the layer runs. Under autograd,
``F.linear(x, cast_weight)`` then saves that cast copy for the backward pass: a frozen weight needs no
gradient, but ``grad_x = grad_out @ W`` needs W. With gradient checkpointing a block's recomputation
thus holds the cast copies of all its Linear layers at once - for an fp8 base, a compute-dtype copy of
the block's weights, which undoes most of what storing the weights in fp8 saved.

:func:`recast_linear` saves nothing: it casts again in the backward pass, one layer at a time.
Gradients w.r.t. the input are those of ``F.linear`` (the same matrix product); the weight and bias
get none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

# cast(dtype, device) -> context manager yielding (weight, bias) in that dtype on that device
WeightCast = Callable[[torch.dtype, torch.device], contextlib.AbstractContextManager]


class _RecastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cast: WeightCast) -> torch.Tensor:
        with cast(x.dtype, x.device) as (weight, bias):
            out = F.linear(x, weight, bias)
        ctx.cast, ctx.dtype, ctx.device = cast, x.dtype, x.device
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        with ctx.cast(ctx.dtype, ctx.device) as (weight, _bias):
            grad_x = grad_out.matmul(weight)
        return grad_x, None


def recast_linear(x: torch.Tensor, cast: WeightCast) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with (weight, bias) from ``cast``, which runs again for the backward
    pass instead of autograd keeping its result. The weight and bias must not need gradients."""
    return _RecastLinear.apply(x, cast)
