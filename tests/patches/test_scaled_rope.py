"""LTScaledRoPE: each mode's frequencies match an independent implementation of its published formula;
at the training resolution (and with mode none) the patched model is bit-identical."""

import math

import pytest
import torch
from test_context_drop import FAMILIES, apply_model, inputs, models  # noqa: F401  (fixture)

from lumina_turbo.devtools.harness import graph
from lumina_turbo.patches import scaled_rope
from lumina_turbo.samplers import rope_scaling

MODES = ("pi", "ntk", "frequency_aware", "time_aware")


# Independent implementations, one frequency at a time, straight from the papers' formulas.
def ref_frequencies(mode, d, b, s, L=None, t=None):
    def w(base, i):
        return base ** (-2.0 * i / d)

    out = []
    for i in range(d // 2):
        if mode == "pi":  # Chen et al. 2023: positions / s
            out.append(w(b, i) / s)
        elif mode == "ntk":  # bloc97 / YaRN: b' = b s^(d/(d-2))
            out.append(w(b * s ** (d / (d - 2)), i))
        elif mode == "frequency_aware":  # Lumina-Next: d_target = d log_b(L / 2 pi), b' = b s^(d/d_target)
            d_target = d * math.log(L / (2 * math.pi), b)
            out.append(max(w(b * s ** (d / d_target), i), w(b, i) / s))
        else:  # time_aware, Lumina-Next: d_t = (d - 1) t + 1, b_t = b s^(d/d_t)
            d_t = (d - 1) * t + 1
            out.append(max(w(b * s ** (d / d_t), i), w(b, i) / s))
    return torch.tensor(out, dtype=torch.float64)


CASES = [
    (32, 10000.0, 2.0, 64, 0.0),
    (32, 10000.0, 2.0, 64, 0.7),
    (48, 256.0, 1.5, 64, 0.3),
    (8, 10000.0, 3.0, 16, 1.0),
    (128, 10000.0, 4.0, 128, 0.5),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("d, b, s, L, t", CASES)
def test_frequencies_match_the_formulas(mode, d, b, s, L, t):
    got = rope_scaling.scaled_frequencies(mode, d, b, s, train_len=L, t=t)
    torch.testing.assert_close(got, ref_frequencies(mode, d, b, s, L, t), rtol=1e-12, atol=0)


def test_anchor_properties():
    d, b, s = 32, 10000.0, 2.0
    base = rope_scaling.base_frequencies(d, b)
    ntk = rope_scaling.scaled_frequencies("ntk", d, b, s)
    assert ntk[0] == base[0]  # the highest frequency is kept
    assert math.isclose(float(ntk[-1]), float(base[-1]) / s)  # the lowest one is divided by exactly s
    # frequency-aware: the dimension whose wavelength equals L (2i = d/2 here) is interpolated exactly
    L = 2 * math.pi * b**0.5
    fa = rope_scaling.scaled_frequencies("frequency_aware", d, b, s, train_len=L)
    assert math.isclose(float(fa[8]), float(base[8]) / s)
    assert torch.all(fa[:8] > base[:8] / s) and torch.allclose(fa[8:], base[8:] / s)
    # time-aware: PI-like at the noise end (t = 0), NTK with base b s at the data end (t = 1)
    t0 = rope_scaling.scaled_frequencies("time_aware", d, b, s, t=0.0)
    assert t0[0] == 1.0 and torch.allclose(t0[1:], base[1:] / s)
    torch.testing.assert_close(
        rope_scaling.scaled_frequencies("time_aware", d, b, s, t=1.0), rope_scaling.base_frequencies(d, b * s)
    )
    # a training length under 2 pi tokens puts every wavelength beyond it: frequency-aware is then PI
    torch.testing.assert_close(
        rope_scaling.scaled_frequencies("frequency_aware", d, b, s, train_len=6.0), base / s
    )
    for mode in ("none", *MODES):  # no extrapolation, no change
        assert torch.equal(rope_scaling.scaled_frequencies(mode, d, b, 1.0, train_len=64, t=0.5), base)
    with pytest.raises(ValueError, match="mode: expected"):
        rope_scaling.rope_plan("yarn", d, b, s)


def rotation_table(pos, freqs):
    angle = pos.double()[..., None] * freqs
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*angle.shape, 2, 2).float()


@pytest.mark.parametrize("mode", MODES)
def test_embedder_tables_match_the_formulas(mode):
    from lumina_turbo.devtools.comfy_host import bootstrap

    bootstrap()
    from comfy.ldm.flux.layers import EmbedND

    axes, theta, train_tokens = [8, 16, 16], 10000.0, 8.0
    rows, cols = torch.meshgrid(torch.arange(12.0), torch.arange(9.0), indexing="ij")
    ids = torch.zeros(1, 5 + 108, 3)
    ids[0, :5, 0] = torch.arange(1.0, 6.0)
    ids[0, 5:, 0], ids[0, 5:, 1], ids[0, 5:, 2] = 6.0, rows.flatten(), cols.flatten()
    embedder = scaled_rope.ScaledRopeEmbedder(sum(axes), theta, axes, mode, train_tokens)
    timesteps = torch.tensor([0.25])  # sigma; Lumina t = 0.75
    got = scaled_rope.publish_time_wrapper(lambda *a, **k: embedder(ids), None, timesteps)
    exact = EmbedND(sum(axes), theta, axes)(ids)
    assert got.shape == exact.shape
    torch.testing.assert_close(got[..., :4, :, :], exact[..., :4, :, :], rtol=0, atol=0)  # caption axis
    start = 4
    for axis, extent in ((1, 12), (2, 9)):
        d = axes[axis]
        s = extent / train_tokens
        want = rotation_table(ids[0, :, axis], ref_frequencies(mode, d, theta, s, train_tokens, 0.75))
        torch.testing.assert_close(got[0, 0, :, start : start + d // 2], want, rtol=1e-5, atol=1e-5)
        start += d // 2


@pytest.mark.parametrize("family", FAMILIES)
def test_training_resolution_and_none_are_bit_identical(models, family):  # noqa: F811
    model = models[family]
    x, context = inputs(seed=2)  # 14 x 10 latent: 7 x 5 tokens
    exact = apply_model(model, x, 0.6, context)
    for mode in MODES:
        at_train = scaled_rope.apply_scaled_rope(model, mode, train_resolution=7 * 16)
        assert torch.equal(apply_model(at_train, x, 0.6, context), exact), mode
        if family == "lumina2" or mode == "time_aware":  # (the 1024-wide Z-Image forward is slow on 2 cores)
            beyond = scaled_rope.apply_scaled_rope(model, mode, train_resolution=32)
            assert not torch.equal(apply_model(beyond, x, 0.6, context), exact), mode
    assert torch.equal(apply_model(scaled_rope.apply_scaled_rope(model, "none", 32), x, 0.6, context), exact)


def test_executor(comfy_host):
    g = graph()
    loader = g.node(
        "LTModelLoader",
        model="tiny-random-lumina2",
        text_encoder="(from the diffusers folder)",
        vae="(from the diffusers folder)",
        weight_dtype="default",
    )
    pos = g.node("CLIPTextEncode", text="a red cat", clip=loader.out(1))
    latent = g.node("EmptySD3LatentImage", width=64, height=48, batch_size=1)
    branches = {"plain": loader.out(0)}
    for name, mode, res in (("train", "time_aware", 1024), ("beyond", "frequency_aware", 32)):
        branches[name] = g.node("LTScaledRoPE", model=loader.out(0), mode=mode, train_resolution=res).out(0)
    for name, model in branches.items():
        sampled = g.node(
            "KSampler",
            model=model,
            positive=pos.out(0),
            negative=pos.out(0),
            latent_image=latent.out(0),
            seed=4,
            steps=1,
            cfg=1.0,
            sampler_name="euler",
            scheduler="simple",
            denoise=1.0,
        )
        g.node("SaveLatent", samples=sampled.out(0), filename_prefix=f"{name}_rope")
    lat = comfy_host.latents(comfy_host.run(g.finalize()))
    assert torch.equal(lat["train"], lat["plain"])
    assert torch.isfinite(lat["beyond"]).all() and not torch.equal(lat["beyond"], lat["plain"])
