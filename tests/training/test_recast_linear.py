"""recast_linear: F.linear over a frozen weight cast per call, cast again in backward instead of saved.

* Output and input gradient are bit-identical to autograd's F.linear on the cast weight (3-D input
  with a bias, 2-D without), so training on an fp8 base follows the same path as before.
* Autograd saves nothing for it, and the cast runs once in forward and once in backward.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from lumina_turbo.training.recast_linear import recast_linear


def fp8_layer(out_features, in_features, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=gen) * 0.05).to(torch.float8_e4m3fn)
    return weight, (torch.randn(out_features, generator=gen).to(torch.float8_e4m3fn) if bias else None)


def counting_cast(weight, bias):
    calls = []

    @contextlib.contextmanager
    def cast(dtype, device):
        calls.append(dtype)
        yield weight.to(device, dtype), None if bias is None else bias.to(device, dtype)

    return cast, calls


@pytest.mark.parametrize(("shape", "bias"), [((2, 7, 48), True), ((5, 48), False)])
def test_output_and_input_gradient_equal_autograds_linear(shape, bias):
    weight, bias_t = fp8_layer(32, 48, bias)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(*shape[:-1], 32, generator=torch.Generator().manual_seed(2))

    x_ref = x.clone().requires_grad_(True)
    reference = F.linear(x_ref, weight.float(), None if bias_t is None else bias_t.float())
    reference.backward(grad_out)

    cast, calls = counting_cast(weight, bias_t)
    x_new = x.clone().requires_grad_(True)
    out = recast_linear(x_new, cast)
    out.backward(grad_out)

    assert torch.equal(out, reference)
    assert torch.equal(x_new.grad, x_ref.grad)
    assert calls == [torch.float32, torch.float32]  # forward, then backward


def test_autograd_saves_nothing_for_it():
    weight, bias = fp8_layer(64, 96, True)
    cast, _ = counting_cast(weight, bias)
    x = torch.randn(3, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        recast = recast_linear(x, cast)
    assert saved == []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F.linear(x, weight.float(), bias.float())
    # what it replaces keeps the fp32 copy of the weight (64 x 96 x 4 bytes) until backward
    assert [t.untyped_storage().nbytes() for t in saved] == [64 * 96 * 4]
    recast.sum().backward()
    assert x.grad is not None
