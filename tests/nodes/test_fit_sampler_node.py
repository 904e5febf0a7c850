"""LTFitSampler through ComfyUI's real executor on a tiny random Lumina-2: fit, sample, disk cache, errors."""

import json

import pytest
import torch

from lumina_turbo.devtools.harness import PromptFailed, graph
from lumina_turbo.devtools.prompts import empty_latent, encode, fit_sampler, tiny_loader
from lumina_turbo.devtools.training_support import one_thread  # noqa: F401 (autouse: one torch thread)


def fit_and_sample(
    steps=3, solver="multistep", fit="bespoke", iterations=4, samples=8, guider="CFGGuider", **optional
):
    g = graph()
    loader = tiny_loader(g, "lumina2")
    pos, neg = encode(g, "lumina2", loader.out(1), "a red cat"), encode(g, "lumina2", loader.out(1), "blurry")
    guide = g.node(guider, model=loader.out(0), positive=pos.out(0), negative=neg.out(0), cfg=3.0)
    latent = empty_latent(g, width=64, height=64)
    fitted = fit_sampler(
        g, guide.out(0), latent.out(0), steps=steps, solver=solver, fit=fit, calibration_samples=samples,
        iterations=iterations, batch_size=4, **optional,
    )  # fmt: skip
    sampled = g.node(
        "SamplerCustomAdvanced",
        noise=g.node("RandomNoise", noise_seed=3).out(0),
        guider=guide.out(0),
        sampler=fitted.out(0),
        sigmas=fitted.out(1),
        latent_image=latent.out(0),
    )
    g.node("SaveLatent", samples=sampled.out(0), filename_prefix="fit")
    g.node("SaveImage", images=fitted.out(2), filename_prefix="fitplot")
    return g.finalize()


def _cache_files(host):
    return sorted((host.output_dir / "lumina_turbo" / "fits").glob("*.json"))


def _small_fit_report(host, seed, **optional) -> dict:
    """The report of a 2-step, 3-iteration fit on 8 samples, read from the cache entry it writes (its own)."""
    before = set(_cache_files(host))
    host.run(fit_and_sample(steps=2, iterations=3, samples=8, seed=seed, **optional))
    (written,) = set(_cache_files(host)) - before
    return json.loads(written.read_text())["report"]


def test_fit_samples_and_is_cached_on_disk(comfy_host, monkeypatch):
    from lumina_turbo.nodes import fit_sampler as node_module

    before = set(_cache_files(comfy_host))
    latent = comfy_host.latent(comfy_host.run(fit_and_sample()))
    assert latent.shape[0] == 1 and torch.isfinite(latent).all()
    (written,) = set(_cache_files(comfy_host)) - before
    fitted = node_module.FittedSampler.from_json(written.read_text())
    assert fitted.model_calls == 3 and fitted.report["calibration_samples"] == 6
    assert fitted.report["validation_error"] <= fitted.report["start_validation_error"]

    def no_fit(*args, **kwargs):
        raise AssertionError("the second run must read the cache")

    monkeypatch.setattr(node_module, "fit_with_guider", no_fit)
    comfy_host.executor.reset()  # forget the executor's own output cache: the node runs again
    again = comfy_host.latent(comfy_host.run(fit_and_sample()))
    assert torch.equal(again, latent)
    assert set(_cache_files(comfy_host)) - before == {written}


def test_sampling_costs_the_budget_and_the_fit_sees_the_calibration_batch(comfy_host):
    # midpoint, 2 steps = 4 guider calls per image, cond and uncond batched in one transformer pass each
    from comfy.ldm.lumina.model import NextDiT

    rows = []

    def count_transformer(module, args, kwargs, output):
        if isinstance(module, NextDiT):
            rows.append(output.shape[0])

    hook = torch.nn.modules.module.register_module_forward_hook(count_transformer, with_kwargs=True)
    try:
        comfy_host.latent(comfy_host.run(fit_and_sample(steps=2, solver="midpoint", iterations=2, samples=6)))
    finally:
        hook.remove()
    # the image: 4 guider calls of one row, cond and uncond each a pass (ComfyUI does not batch them on CPU);
    # the fit before it only ever sees calibration batches (reference/fit chunks of 4, validation of 2)
    assert rows[-8:] == [1] * 8
    assert rows[:-8] and all(count in (2, 4) for count in rows[:-8])


def test_samples_per_iteration_shrinks_each_gradient_batch(comfy_host):
    def fit_cost(**optional):
        return _small_fit_report(comfy_host, seed=5, **optional)["fit_cost"]["samples"]

    # 8 samples: 6 optimised, 2 held back; drawn batches of 2 instead of 6; 2 calls per run; 3 iterations:
    # one fitting the schedule with each final step (Euler, extrapolated), then 2 from the better one
    assert fit_cost() - fit_cost(samples_per_iteration=2) == (2 + 2) * 2 * (6 - 2)


def test_restarts_run_whole_fits_and_keep_the_best(comfy_host):
    single, best = _small_fit_report(comfy_host, seed=6), _small_fit_report(comfy_host, seed=6, restarts=2)
    assert best["fit_cost"]["samples"] == 2 * single["fit_cost"]["samples"]  # the reference is shared
    assert len(best["restart_errors"]) == 2 and best["restart_seed"] in (6, 7)
    assert best["restart_errors"][0] == pytest.approx(
        (single["calibration_error"] * 6 + single["validation_error"] * 2) / 8, rel=1e-6
    )  # the first restart is the single fit with the same seed


def test_settle_iterations_reach_the_fit_and_its_cache_key(comfy_host):
    plain = _small_fit_report(comfy_host, seed=8)
    settled = _small_fit_report(comfy_host, seed=8, settle_iterations=2)
    assert settled["settle_iterations"] == 2 and plain["settle_iterations"] == 0
    # 2 more iterations: 6 optimised and 2 held-back samples through the 2-call sampler each
    assert settled["fit_cost"]["samples"] - plain["fit_cost"]["samples"] == 2 * (6 + 2) * 2
    assert settled["validation_error"] <= plain["validation_error"]


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"steps": 0}, "steps"),
        ({"solver": "rk45"}, "solver"),
        ({"samples": 2000}, "calibration_samples"),
        ({"samples_per_iteration": -1}, "samples_per_iteration"),
        ({"restarts": 9}, "restarts"),
        ({"settle_iterations": 5000}, "settle_iterations"),
    ],
)
def test_bad_inputs_refused(comfy_host, changes, pattern):
    with pytest.raises(PromptFailed) as failure:
        comfy_host.run(fit_and_sample(**changes))
    assert pattern in str(failure.value.details)
