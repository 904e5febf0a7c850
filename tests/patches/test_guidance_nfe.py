"""NFE accounting and batch safety of LTCFGGuider / LTCFGPatch on the tiny Lumina-2 model.

A DIFFUSION_MODEL wrapper (tests/guidance_counting.py) counts the transformer batch rows really evaluated
(x.shape[0] per forward) and which branch each row was (``cond_or_uncond``: 0 = positive, 1 = negative).
Expected counts come from each source's own inequality written inline (ComfyUI sigma, 1 = noise; Lumina
t = 1 - sigma), from hand counts, and -- for multi-stage samplers -- from the sampler step of each call read
back from the whole run (the calls and the sampler's step reports, in order).
"""

import pytest
import torch

from lumina_turbo.devtools.comfy_host import COMFY_DIR, bootstrap
from lumina_turbo.devtools.guidance_counting import RowCounter

bootstrap()

import comfy.patcher_extension  # noqa: E402
import comfy.samplers  # noqa: E402
import nodes  # noqa: E402

from lumina_turbo.loading import model_files  # noqa: E402
from lumina_turbo.nodes.guidance import LTCFGGuider, LTCFGPatch  # noqa: E402
from lumina_turbo.samplers.flow_solvers import sample_flow_midpoint  # noqa: E402

OPTIONS = dict(
    renorm=1.0, renorm_mode="cap", trunc_mode="off", trunc=0.25, after_trunc="cond", cfg_formula="comfy"
)
MODES = {"off": 0.25, "step_fraction": 0.25, "lumina_t": 0.3, "zimage": 0.5, "sigma": 0.6, "last_steps": 5}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny model: a second OpenMP thread only adds spin-waiting on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    patcher = model_files.load_transformer_folder(COMFY_DIR / "models" / "diffusers" / "tiny-random-lumina2")
    generator = torch.Generator().manual_seed(11)
    conds = {
        "positive": [[torch.randn(1, 7, 32, generator=generator), {}]],
        "negative_equal": [[torch.randn(1, 7, 32, generator=generator), {}]],
        "negative_shorter": [[torch.randn(1, 4, 32, generator=generator), {}]],
    }
    sigmas30 = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", 30)
    return patcher, conds, sigmas30


def counted(patcher):
    counter = RowCounter()
    model = patcher.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_rows", counter)
    return model, counter


def run_guider(tiny, sigmas, cfg=4.0, negative="negative_equal", sampler="euler", batch=1, seed=0, **options):
    """Sample through LTCFGGuider; the counter also records the sampler's step reports (its callback)."""
    patcher, conds, _ = tiny
    model, counter = counted(patcher)
    guider = LTCFGGuider.execute(
        model=model,
        positive=conds["positive"],
        cfg=cfg,
        negative=None if negative is None else conds[negative],
        **{**OPTIONS, **options},
    ).result[0]
    if isinstance(sampler, str):
        sampler = comfy.samplers.sampler_object(sampler)
    noise = torch.randn(batch, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    out = guider.sample(
        noise, torch.zeros_like(noise), sampler, sigmas, seed=seed, disable_pbar=True, callback=counter.report
    )
    return out, counter


def reference_guided(mode, value, sigmas):
    """Which of the N steps keep CFG, from each source's inequality (step start sigma s_i)."""
    s = sigmas[:-1].tolist()
    n = len(s)
    if mode == "off":
        return [True] * n
    if mode == "step_fraction":  # diffusers Lumina2Pipeline: truncated when (i + 1) / N > cfg_trunc_ratio
        return [(i + 1) / n <= value for i in range(n)]
    if mode == "lumina_t":  # official forward_with_cfg: t[0] < cfg_trunc, t = 1 - sigma in float32
        return [bool(1 - torch.tensor(si, dtype=torch.float32) < value) for si in s]
    if mode == "zimage":  # Z-Image: guidance 0 when (1000 - timestep) / 1000 > cfg_truncation
        return [float((1000 - torch.tensor(si, dtype=torch.float32) * 1000) / 1000) <= value for si in s]
    if mode == "sigma":
        return [si >= value for si in s]
    if mode == "last_steps":  # Wan 2.x recipe: is_final_steps = step_idx >= len(timesteps) - n
        return [i < n - value for i in range(n)]
    raise AssertionError(mode)


@pytest.mark.parametrize("negative", ["negative_equal", "negative_shorter"])
@pytest.mark.parametrize("mode", list(MODES))
def test_rows_equal_formula_every_mode(tiny, mode, negative):
    sigmas = tiny[2]
    _, counter = run_guider(tiny, sigmas, negative=negative, trunc_mode=mode, trunc=MODES[mode])
    guided = reference_guided(mode, MODES[mode], sigmas)
    assert 0 < sum(guided) <= 30
    assert counter.rows == 30 + sum(guided)
    assert [rows for _, rows in counter.rows_by_sigma()] == [2 if g else 1 for g in guided]
    # equal token lengths batch cond+uncond into one forward; different lengths need two
    expected_forwards = 30 if negative == "negative_equal" else 30 + sum(guided)
    assert len(counter.forwards) == expected_forwards
    last_sigma = counter.forwards[-1][0]
    last_step = sorted(b for sigma, branches, _ in counter.forwards if sigma == last_sigma for b in branches)
    assert last_step == ([0, 1] if mode == "off" else [0])  # truncated: the positive alone


def test_hand_counts_30_steps(tiny):
    sigmas = tiny[2]
    assert run_guider(tiny, sigmas, trunc_mode="step_fraction", trunc=0.25)[1].rows == 37  # 7 guided steps
    assert run_guider(tiny, sigmas, trunc_mode="last_steps", trunc=5)[1].rows == 55
    assert run_guider(tiny, sigmas, trunc_mode="off")[1].rows == 60


def test_after_trunc_uncond_evaluates_only_the_negative(tiny):
    _, counter = run_guider(
        tiny,
        tiny[2],
        negative="negative_shorter",
        trunc_mode="step_fraction",
        trunc=0.25,
        after_trunc="uncond",
    )
    assert counter.rows == 37
    assert [branches for _, branches, _ in counter.forwards[-23:]] == [(1,)] * 23


@pytest.mark.parametrize(
    "cfg, cfg_formula, rows", [(1.0, "comfy", 30), (0.0, "zimage", 30), (1.0, "zimage", 60)]
)
def test_no_guidance_is_one_pass_per_step(tiny, cfg, cfg_formula, rows):
    _, counter = run_guider(tiny, tiny[2], cfg=cfg, cfg_formula=cfg_formula, renorm=0.5)
    assert counter.rows == rows
    if rows == 30:
        assert {branches for _, branches, _ in counter.forwards} == {(0,)}


def test_no_negative_at_cfg_1(tiny):
    _, counter = run_guider(tiny, tiny[2], cfg=1.0, negative=None, trunc_mode="step_fraction", trunc=0.25)
    assert counter.rows == 30


MIDPOINT = comfy.samplers.KSAMPLER(sample_flow_midpoint)


@pytest.mark.parametrize(
    "sampler, mode, trunc, calls, rows",
    [
        # one call per step: 7 guided steps of 30 (step_fraction 0.25), 25 (last_steps 5)
        ("dpmpp_2m", "step_fraction", 0.25, 30, 30 + 7),
        ("dpmpp_2m", "last_steps", 5, 30, 30 + 25),
        # predictor at s_i + corrector at s_{i+1} (step i's, although step i+1 starts there); the last step,
        # to sigma 0, is Euler: 29 two-call steps + 1; every call of a guided step evaluates both branches
        ("heun", "step_fraction", 0.25, 59, 59 + 2 * 7),
        ("heun", "last_steps", 5, 59, 59 + 2 * 25),
        # two calls per step, the second inside the step (the RF variant's last step is Euler)
        ("dpmpp_2s_ancestral", "step_fraction", 0.25, 59, 59 + 2 * 7),
        ("dpmpp_2s_ancestral", "last_steps", 5, 59, 59 + 2 * 25),
        (MIDPOINT, "step_fraction", 0.25, 60, 60 + 2 * 7),
        (MIDPOINT, "last_steps", 5, 60, 60 + 2 * 25),
    ],
    ids=lambda v: "flow_midpoint" if v is MIDPOINT else None,
)
def test_multi_stage_samplers_guide_whole_steps(tiny, sampler, mode, trunc, calls, rows):
    _, counter = run_guider(tiny, tiny[2], sampler=sampler, trunc_mode=mode, trunc=trunc)
    assert (len(counter.rows_by_sigma()), counter.rows) == (calls, rows)


SAMPLERS = ["euler", "heun", "heunpp2", "dpm_2_ancestral", "dpmpp_2m", "dpmpp_2s_ancestral", "sa_solver_pece"]


@pytest.mark.parametrize(
    "sampler", [*SAMPLERS, MIDPOINT], ids=lambda v: "flow_midpoint" if v is MIDPOINT else v
)
@pytest.mark.parametrize("mode, trunc", [("last_steps", 5), ("step_fraction", 0.5), ("zimage", 0.2)])
@pytest.mark.parametrize("partial", [False, True], ids=["full", "split"])
def test_every_call_of_a_guided_step_is_guided(tiny, sampler, mode, trunc, partial):
    """6 steps with CFG on the first 1 (last_steps 5) or 3 (step_fraction 0.5), or while Lumina t at the step's
    start <= 0.2 (4 steps; 2 of the ``split`` ones): the low half of a 12-step schedule, as after SplitSigmas,
    which starts below 1, where the first step's later stages land near the next point."""
    sigmas = comfy.samplers.calculate_sigmas(tiny[0].get_model_object("model_sampling"), "simple", 12)
    sigmas = sigmas[6:] if partial else sigmas[::2]
    _, counter = run_guider(tiny, sigmas, sampler=sampler, trunc_mode=mode, trunc=trunc)
    guided = reference_guided(mode, trunc, sigmas)
    assert 0 < sum(guided) < 6
    steps = counter.steps_of_calls()
    assert len(steps) > 6 or sampler in (
        "euler",
        "dpmpp_2m",
    )  # multi-stage samplers have more calls than steps
    assert [rows for _, rows in counter.rows_by_sigma()] == [2 if guided[step] else 1 for step in steps]


def test_lumina_t_decides_per_model_call_like_official(tiny):
    _, counter = run_guider(tiny, tiny[2], sampler="heun", trunc_mode="lumina_t", trunc=0.3)
    calls = counter.rows_by_sigma()
    assert len(calls) == 59
    for sigma, rows in calls:  # official: CFG on this call iff t = 1 - sigma < cfg_trunc
        assert rows == (2 if bool(1 - torch.tensor(sigma, dtype=torch.float32) < 0.3) else 1)


def stock_ksampler(model, conds, cfg, steps=30, batch=1, sampler="euler"):
    latent = {"samples": torch.zeros(batch, 16, 8, 8)}
    return nodes.KSampler().sample(
        model, 0, steps, cfg, sampler, "simple", conds["positive"], conds["negative_shorter"], latent
    )[0]["samples"]


@pytest.mark.parametrize(
    "cfg, cfg_formula, rows", [(4.0, "comfy", 37), (1.0, "comfy", 30), (0.0, "zimage", 30)]
)
def test_patch_with_stock_ksampler(tiny, cfg, cfg_formula, rows):
    patcher, conds, _ = tiny
    model, counter = counted(patcher)
    patched = LTCFGPatch.execute(
        model=model, **{**OPTIONS, "trunc_mode": "step_fraction", "cfg_formula": cfg_formula}
    )
    stock_ksampler(patched.result[0], conds, cfg)
    assert counter.rows == rows


def test_patch_with_stock_ksampler_heun_guides_whole_steps(tiny):
    """The stock KSampler passes its own preview callback: the patch counts steps through it too."""
    patcher, conds, _ = tiny
    model, counter = counted(patcher)
    patched = LTCFGPatch.execute(model=model, **{**OPTIONS, "trunc_mode": "last_steps", "trunc": 5})
    stock_ksampler(patched.result[0], conds, 4.0, sampler="heun")
    assert (len(counter.rows_by_sigma()), counter.rows) == (59, 59 + 2 * 25)


# --- batch 2 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_batch2_equals_two_single_runs(tiny, mode):
    sigmas = comfy.samplers.calculate_sigmas(tiny[0].get_model_object("model_sampling"), "simple", 6)
    options = dict(
        trunc_mode=mode,
        trunc={"last_steps": 2, "step_fraction": 0.5}.get(mode, MODES[mode]),
        renorm_mode="rescale_lastdim" if mode == "sigma" else "cap",
        renorm=1.0,
    )
    both, counter = run_guider(tiny, sigmas, batch=2, seed=5, **options)
    assert torch.isfinite(both).all() and counter.rows == 2 * run_guider(tiny, sigmas, **options)[1].rows
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    patcher, conds, _ = tiny
    for i in range(2):  # per-sample renorm: each sample as if it were alone
        guider = LTCFGGuider.execute(
            model=patcher,
            positive=conds["positive"],
            negative=conds["negative_equal"],
            cfg=4.0,
            **{**OPTIONS, **options},
        ).result[0]
        alone = guider.sample(
            noise[i : i + 1],
            torch.zeros_like(noise[:1]),
            comfy.samplers.sampler_object("euler"),
            sigmas,
            seed=5,
            disable_pbar=True,
        )
        assert (both[i : i + 1] - alone).abs().max() < 1e-4


def test_stock_renormcfg_fails_on_batch2_where_the_patch_works(tiny):
    """The motivation, checked: ComfyUI's RenormCFG cannot take a batch of 2 (ambiguous tensor truth value)."""
    from comfy_extras.nodes_lumina2 import RenormCFG

    patcher, conds, _ = tiny
    stock = RenormCFG.execute(model=patcher, cfg_trunc=100.0, renorm_cfg=1.0).result[0]
    with pytest.raises(RuntimeError, match="ambiguous"):
        stock_ksampler(stock, conds, 4.0, steps=2, batch=2)
    ours = LTCFGPatch.execute(model=patcher, **OPTIONS).result[0]
    assert torch.isfinite(stock_ksampler(ours, conds, 4.0, steps=2, batch=2)).all()


def test_post_cfg_hooks_of_other_nodes_still_run(tiny):
    """A post-CFG patch applied before LTCFGPatch runs on every step; after truncation it sees cond == uncond."""
    patcher, conds, _ = tiny
    seen = []

    def post_cfg(args):
        seen.append(torch.equal(args["cond_denoised"], args["uncond_denoised"]))
        return args["denoised"]

    model, counter = counted(patcher)
    model.set_model_sampler_post_cfg_function(post_cfg)
    patched = LTCFGPatch.execute(model=model, **{**OPTIONS, "trunc_mode": "step_fraction"}).result[0]
    stock_ksampler(patched, conds, 4.0)
    assert counter.rows == 37
    assert seen == [False] * 7 + [True] * 23
