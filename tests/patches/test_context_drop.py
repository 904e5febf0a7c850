"""LTContextDrop: pooled keys/values match an independent reference; off, and by default at the last
sampled sigma of real schedules, the patched model is bit-identical (model apply and the real
executor, tiny Lumina-2 and Z-Image, a 26-layer Lumina-2); fallbacks warn once."""

import logging

import pytest
import torch

from lumina_turbo.devtools.comfy_host import bootstrap
from lumina_turbo.devtools.harness import PromptFailed, graph
from lumina_turbo.devtools.prompts import empty_latent, ksampler, save_latent, tiny_loader
from lumina_turbo.patches import context_drop
from lumina_turbo.patches.context_drop import ContextDropSettings

FAMILIES = ("lumina2", "zimage")
PAD = {"lumina2": None, "zimage": 32}  # NextDiT pad_tokens_multiple of each family
DEPTH = {"lumina2": 26, "zimage": 30}  # main layers of the released models


@pytest.fixture
def fresh_log(monkeypatch):
    """The once-per-process warnings as if no fallback had happened yet."""
    monkeypatch.setattr(context_drop, "_logged", set())


@pytest.fixture(scope="module")
def models(tiny_models):
    bootstrap()
    from lumina_turbo.loading import model_files

    return {
        f: model_files.load_transformer_file(
            tiny_models / "diffusion_models" / f"tiny-random-{f}.safetensors"
        )
        for f in FAMILIES
    }


def apply_model(patcher, x, sigma, context, extra_options=None):
    """``BaseModel.apply_model`` with transformer_options built the way ComfyUI's sampler builds them
    (model_options + the patcher's wrappers), object patches applied."""
    import comfy.patcher_extension as pe

    options = pe.copy_nested_dicts(patcher.model_options["transformer_options"])
    options.update(extra_options or {})
    pe.merge_nested_dicts(options.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    patcher.patch_model()
    try:
        sigmas = torch.full((x.shape[0],), float(sigma))
        return patcher.model.apply_model(
            x, sigmas, c_crossattn=context, num_tokens=context.shape[1], transformer_options=options
        )
    finally:
        patcher.unpatch_model()


def inputs(seed=0, h=14, w=10, cap=7, batch=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, h, w, generator=gen), torch.randn(batch, cap, 32, generator=gen)


# --- pure parts --------------------------------------------------------------------------------


def test_strength_and_layer_choice():
    assert context_drop.drop_strength(1.0) == 1.0 and context_drop.drop_strength(0.0) == 0.0
    assert context_drop.drop_strength(0.3) == 0.0 and context_drop.drop_strength(0.65) == pytest.approx(0.5)
    assert context_drop.drop_strength(0.5, start_sigma=0.8, end_sigma=0.2) == pytest.approx(0.5)
    assert context_drop.drop_strength(0.9, start_sigma=0.8, end_sigma=0.2) == 1.0
    assert context_drop.dropping_layers(1.0, [0, 1, 2, 3]) == {0, 1, 2, 3}
    assert context_drop.dropping_layers(0.5, [0, 1, 2, 3]) == {0, 2}  # spread over depth
    assert context_drop.dropping_layers(0.1, [0, 1, 2, 3]) == set()
    assert context_drop.parse_layers("all") is None
    assert context_drop.parse_layers(" 0-2, 7 ") == (0, 1, 2, 7)
    for bad in ("3-1", "x", "-2"):
        with pytest.raises(ValueError, match="layers: expected"):
            context_drop.parse_layers(bad)
    with pytest.raises(ValueError, match="start_sigma/end_sigma"):
        ContextDropSettings(start_sigma=0.2, end_sigma=0.5)


def reference_pool(tokens, grid, r):
    """Mean of every r x r window of a row-major grid (edge windows: of the tokens they hold), by loops."""
    h, w = grid
    out = []
    for i0 in range(0, h, r):
        for j0 in range(0, w, r):
            idx = [i * w + j for i in range(i0, min(i0 + r, h)) for j in range(j0, min(j0 + r, w))]
            out.append(tokens[:, :, idx].mean(dim=2))
    return torch.stack(out, dim=2)


@pytest.mark.parametrize("grid, r", [((4, 3), 2), ((7, 5), 3), ((6, 6), 2), ((1, 5), 3), ((8, 8), 4)])
def test_pool_grid_matches_loops(grid, r):
    tokens = torch.randn(2, 3, grid[0] * grid[1], 5)
    torch.testing.assert_close(context_drop.pool_grid(tokens, grid, r), reference_pool(tokens, grid, r))
    # NextDiT's layout: (B, tokens, heads, d) moved to (B, heads, tokens, d), a non-contiguous view
    strided = tokens.movedim(1, 2).contiguous().movedim(2, 1)
    torch.testing.assert_close(context_drop.pool_grid(strided, grid, r), reference_pool(tokens, grid, r))
    half = context_drop.pool_grid(tokens.bfloat16(), grid, r)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(
        half.float(), reference_pool(tokens.bfloat16().float(), grid, r), atol=1e-2, rtol=1e-2
    )


def sdpa(q, k, v, heads, mask=None, skip_reshape=True, **_):
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(q.shape[0], -1, heads * q.shape[-1])


def test_masks_are_pooled_when_constant_and_honoured_by_falling_back(caplog, fresh_log):
    cap, grid = 3, (4, 4)
    n = cap + 16
    q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
    plan = context_drop.ForwardPlan(2, frozenset({0}), 0, 0, cap, 16, grid)
    mask = torch.zeros(1, 1, n, n)
    mask[..., 1] = float("-inf")  # mask one caption key: constant inside every window
    got = plan.override(sdpa, q, k, v, 2, mask, skip_reshape=True)
    pooled = lambda t: torch.cat((t[:, :, :cap], reference_pool(t[:, :, cap:], grid, 2)), dim=2)  # noqa: E731
    keep = torch.zeros(1, 1, n, cap + 4)
    keep[..., 1] = float("-inf")
    torch.testing.assert_close(got, sdpa(q, pooled(k), pooled(v), 2, keep))

    mask[..., cap] = float("-inf")  # one image key only: not constant in its window -> exact
    plan = context_drop.ForwardPlan(2, frozenset({0}), 0, 0, cap, 16, grid)
    with caplog.at_level(logging.WARNING):
        got = plan.override(sdpa, q, k, v, 2, mask, skip_reshape=True)
    torch.testing.assert_close(got, sdpa(q, k, v, 2, mask))
    assert any("varies inside a pooling window" in r.getMessage() for r in caplog.records)


def test_unexpected_layout_falls_back_to_exact():
    plan = context_drop.ForwardPlan(2, frozenset({0}), 0, 0, 3, 16, (4, 4))
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))  # not 3 + 16 tokens
    torch.testing.assert_close(plan.override(sdpa, q, k, v, 2, None, skip_reshape=True), sdpa(q, k, v, 2))
    assert plan.failed


def test_an_existing_override_still_runs_with_the_pooled_keys():
    seen = []

    def previous(func, q, k, v, *args, **kwargs):  # e.g. another pack's attention override
        seen.append(k.shape[2])
        return func(q, k, v, *args, **kwargs)

    plan = context_drop.ForwardPlan(2, frozenset({0}), 0, 0, 3, 16, (4, 4), previous)
    q, k, v = (torch.randn(1, 2, 19, 8) for _ in range(3))
    plan.override(sdpa, q, k, v, 2, None, skip_reshape=True)
    assert seen == [3 + 4]


# --- through ComfyUI's model apply --------------------------------------------------------------


def reference_override(cap_len, img_len, grid, r, drop_main):
    """An independent drop: main layers are the calls whose length is caption + image."""
    seen = {"main": 0}

    def override(func, q, k, v, heads, mask=None, **kwargs):
        if q.shape[2] == cap_len + img_len:
            index = seen["main"]
            seen["main"] += 1
            if index in drop_main:
                n = grid[0] * grid[1]
                k, v = (
                    torch.cat(
                        (
                            t[:, :, :cap_len],
                            reference_pool(t[:, :, cap_len : cap_len + n], grid, r),
                            t[:, :, cap_len + n :],
                        ),
                        dim=2,
                    )
                    for t in (k, v)
                )
        return func(q, k, v, heads, mask, **kwargs)

    return override


@pytest.mark.parametrize("family", FAMILIES)
def test_pooled_model_matches_independent_reference(models, family):
    model = models[family]
    x, context = inputs()
    grid = (7, 5)
    pad = PAD[family]
    cap_len = context.shape[1] if pad is None else -(-context.shape[1] // pad) * pad
    img_len = 35 if pad is None else -(-35 // pad) * pad
    n_layers = len(model.model.diffusion_model.layers)
    variants = [(None, set(range(n_layers)))]
    if n_layers > 1:  # only some layers
        variants.append(((n_layers - 1,), {n_layers - 1}))
    for layers, drop_main in variants:
        patched = context_drop.apply_context_drop(model, ContextDropSettings(kernel=2, layers=layers))
        got = apply_model(patched, x, 1.0, context)
        ref = apply_model(
            model,
            x,
            1.0,
            context,
            {"optimized_attention_override": reference_override(cap_len, img_len, grid, 2, drop_main)},
        )
        exact = apply_model(model, x, 1.0, context)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert (got - exact).abs().max() > 1e-3  # it really pooled


@pytest.mark.parametrize("family", FAMILIES)
def test_off_and_data_end_are_bit_identical(models, family):
    model = models[family]
    x, context = inputs(seed=1)
    exact = {s: apply_model(model, x, s, context) for s in (0.0, 1.0)}
    off = context_drop.apply_context_drop(model, ContextDropSettings(kernel=1))
    default = context_drop.apply_context_drop(model, ContextDropSettings())
    assert torch.equal(apply_model(off, x, 1.0, context), exact[1.0])
    assert torch.equal(apply_model(default, x, 0.0, context), exact[0.0])
    assert not torch.equal(apply_model(default, x, 1.0, context), exact[1.0])


def real_schedule(patcher, steps):
    """The sigmas ComfyUI's KSampler evaluates ('simple' scheduler, the model's own shift: Lumina-2 6,
    Z-Image 3), followed by the final 0 that is never evaluated."""
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", steps)


SCHEDULES = [("lumina2", 20), ("lumina2", 30), ("lumina2", 50), ("zimage", 8)]  # released defaults


def dropping(sigma, layers, **settings):
    s = ContextDropSettings(**settings)
    return context_drop.dropping_layers(
        context_drop.drop_strength(float(sigma), s.start_sigma, s.end_sigma), layers
    )


@pytest.mark.parametrize("family, steps", SCHEDULES)
def test_default_drops_no_layer_at_the_last_sampled_sigma(models, family, steps):
    sigmas = real_schedule(models[family], steps)
    layers = list(range(DEPTH[family]))
    last = float(sigmas[-2])
    assert float(sigmas[-1]) == 0.0 and last > 0.1  # sigma 0 itself is never evaluated
    assert dropping(last, layers) == set()
    assert dropping(sigmas[0], layers) == set(layers)
    assert dropping(last, layers, end_sigma=0.0)  # a linear fall to sigma 0 still pools there


@pytest.fixture(scope="module")
def deep_lumina2():
    """A tiny-width Lumina-2 with the released model's 26 main layers."""
    bootstrap()
    from diffusers import Lumina2Transformer2DModel

    from lumina_turbo.devtools import tiny_transformers
    from lumina_turbo.loading import nextdit_build

    config = {**tiny_transformers.TINY_LUMINA2_CONFIG, "num_layers": DEPTH["lumina2"]}
    model = tiny_transformers.reinit_parameters(Lumina2Transformer2DModel(**config), seed=5).eval()
    return nextdit_build.build_nextdit_from_diffusers(model.state_dict(), dict(config))


@pytest.mark.parametrize("family, steps", SCHEDULES)
def test_deep_model_is_bit_identical_at_the_last_sampled_sigma(models, deep_lumina2, family, steps):
    last = float(real_schedule(models[family], steps)[-2])
    x, context = inputs(seed=2)
    exact = apply_model(deep_lumina2, x, last, context)
    assert torch.isfinite(exact).all()
    default = context_drop.apply_context_drop(deep_lumina2, ContextDropSettings())
    assert torch.equal(apply_model(default, x, last, context), exact)
    to_zero = context_drop.apply_context_drop(deep_lumina2, ContextDropSettings(end_sigma=0.0))
    assert not torch.equal(apply_model(to_zero, x, last, context), exact)


def pad_rows_wrapper(executor, x, *args, **kwargs):
    """Another pack's DIFFUSION_MODEL wrapper, inside ours: it adds one patch row to the latent, so
    the attention calls no longer have the layout the context drop planned for."""
    return executor(torch.cat((x, x[:, :, -2:]), dim=2), *args, **kwargs)[:, :, : x.shape[2]]


def test_a_fallback_warns_once_over_many_forwards(models, caplog, fresh_log):
    import comfy.patcher_extension as pe

    def with_inner_wrapper(patcher):
        patched = patcher.clone()
        patched.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test_pad_rows", pad_rows_wrapper)
        return patched

    model = models["lumina2"]
    exact = with_inner_wrapper(model)
    dropped = with_inner_wrapper(context_drop.apply_context_drop(model, ContextDropSettings()))
    with caplog.at_level(logging.WARNING):
        for h, w in ((14, 10), (12, 8), (16, 16), (14, 10)):  # forwards of several shapes
            x, context = inputs(h=h, w=w)
            assert torch.equal(apply_model(dropped, x, 1.0, context), apply_model(exact, x, 1.0, context))
    warnings = [r.getMessage() for r in caplog.records if "LTContextDrop" in r.getMessage()]
    assert len(warnings) == 1 and "does not have the NextDiT layout" in warnings[0]


# --- through the real executor ------------------------------------------------------------------


def drop_prompt(
    family,
    branches=(
        ("plain", None, 1.0),
        ("off", 1, 1.0),
        ("drop", 2, 1.0),
        ("plainend", None, 0.04),
        ("dropend", 2, 0.04),
    ),
    layers="all",
):
    """One prompt on one loader; each branch (name, kernel or None for no patch, denoise) samples and
    saves its latent. cfg 1 (one batch row per step) keeps it cheap on 2 cores."""
    g = graph()
    loader = tiny_loader(g, family)
    pos = g.node("CLIPTextEncode", text="a red cat", clip=loader.out(1))
    latent = empty_latent(g)
    for name, kernel, denoise in branches:
        model = loader.out(0)
        if kernel is not None:
            model = g.node(
                "LTContextDrop",
                model=model,
                kernel=kernel,
                start_sigma=1.0,
                end_sigma=context_drop.DEFAULT_END_SIGMA,
                layers=layers,
            ).out(0)
        # denoise 0.04 with 1 step: one model call at sigma ~0.2 (shift 6) / ~0.11 (shift 3)
        steps = 2 if denoise == 1.0 else 1
        sampled = ksampler(
            g, model, pos.out(0), pos.out(0), latent.out(0), seed=3, steps=steps, denoise=denoise
        )
        save_latent(g, sampled.out(0), f"{name}_cd_{family}")
    return g.finalize()


@pytest.mark.parametrize("family", FAMILIES)
def test_executor_off_and_data_end_identical_drop_changes(comfy_host, family):
    lat = comfy_host.latents(comfy_host.run(drop_prompt(family)))
    assert torch.equal(lat["off"], lat["plain"])
    assert torch.isfinite(lat["drop"]).all() and not torch.equal(lat["drop"], lat["plain"])
    # At sigma <= 0.2, below the default end_sigma (0.3), no layer drops: the data end is exact.
    assert torch.equal(lat["dropend"], lat["plainend"])


def test_bad_inputs_are_refused_before_sampling(comfy_host):
    prompt = drop_prompt("lumina2", (("bad", 2, 1.0),), layers="3-1")
    with pytest.raises(PromptFailed, match="layers: expected"):
        comfy_host.run(prompt)
    node = next(k for k, v in prompt.items() if v["class_type"] == "LTContextDrop")
    prompt[node]["inputs"].update(layers="all", start_sigma=0.1, end_sigma=0.5)
    with pytest.raises(PromptFailed, match="start_sigma/end_sigma"):
        comfy_host.run(prompt)


@pytest.mark.slow
def test_example_workflow_runs_and_its_scaled_rope_acts(comfy_host):
    """example_workflows/api/context_drop_high_res.json at its own size and train_resolution, 1 step:
    it renders, and without its LTScaledRoPE the sampled latent differs (the RoPE patch really acts)."""
    import copy
    import json

    from lumina_turbo.devtools.comfy_host import REPO

    prompt = json.loads((REPO / "example_workflows" / "api" / "context_drop_high_res.json").read_text())
    kinds = {v["class_type"]: k for k, v in prompt.items()}
    assert {"LTContextDrop", "LTScaledRoPE"} <= set(kinds)
    rope = prompt[kinds["LTScaledRoPE"]]["inputs"]
    size = prompt[kinds["EmptySD3LatentImage"]]["inputs"]
    assert rope["mode"] != "none" and max(size["width"], size["height"]) > rope["train_resolution"]
    prompt[kinds["KSampler"]]["inputs"]["steps"] = 1
    prompt["latent"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": [kinds["KSampler"], 0], "filename_prefix": "withrope_cdexample"},
    }
    unpatched = copy.deepcopy(prompt)
    unpatched[kinds["LTContextDrop"]]["inputs"]["model"] = rope["model"]  # the RoPE patch left out
    for kind in ("LTScaledRoPE", "VAEDecode", "SaveImage"):
        del unpatched[kinds[kind]]
    unpatched["latent"]["inputs"]["filename_prefix"] = "norope_cdexample"

    outputs = comfy_host.run(prompt)
    assert len(comfy_host.image_paths(outputs)) == 1
    with_rope = comfy_host.latents(outputs)["withrope"]
    without = comfy_host.latents(comfy_host.run(unpatched))["norope"]
    assert with_rope.shape == without.shape and torch.isfinite(with_rope).all()
    assert (with_rope - without).abs().max() > 1e-2
