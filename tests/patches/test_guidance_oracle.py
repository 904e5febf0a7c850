"""Oracle parity of LTCFGGuider: final latents equal those of the diffusers pipelines and of the official
Lumina-Image-2.0 ``forward_with_cfg`` (written out below from the official formula), from the same initial
latents, prompt embeddings and sigma schedule, on the tiny models in fp32.

Time conventions: ComfyUI sigma (1 = noise) drives our sampling; Lumina t = 1 - sigma drives the official
and diffusers transformers, whose output is dx/dt = x0 - noise (= -v in ComfyUI terms). diffusers latents are
model-space latents; ComfyUI returns ``process_latent_out`` of them, undone here with ``process_in``.
"""

import pytest
import torch

from lumina_turbo.devtools.comfy_host import COMFY_DIR, bootstrap

bootstrap()

import comfy.samplers  # noqa: E402

from lumina_turbo.loading import model_files  # noqa: E402
from lumina_turbo.nodes.guidance import LTCFGGuider  # noqa: E402
from lumina_turbo.samplers.flow_solvers import sample_flow_midpoint  # noqa: E402

TOL = 1e-3
DIFFUSERS = COMFY_DIR / "models" / "diffusers"
OPTIONS = dict(
    renorm=1.0, renorm_mode="cap", trunc_mode="off", trunc=0.25, after_trunc="cond", cfg_formula="comfy"
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: a second OpenMP thread only adds spin-waiting on a shared 2-core machine (often 10x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Family:
    def __init__(self, pipeline_class, name):
        folder = DIFFUSERS / f"tiny-random-{name}"
        self.pipe = pipeline_class.from_pretrained(folder)
        self.pipe.set_progress_bar_config(disable=True)
        self.patcher = model_files.load_transformer_folder(folder)
        generator = torch.Generator().manual_seed(7)
        cap_dim = self.pipe.transformer.config.cap_feat_dim
        self.latents = torch.randn(1, 16, 8, 8, generator=generator)
        # different positive / negative token lengths: ComfyUI then runs them as two forward passes
        self.positive = torch.randn(1, 7, cap_dim, generator=generator)
        self.negative = torch.randn(1, 5, cap_dim, generator=generator)

    def comfy(self, cfg, sigmas, latents=None, sampler=None, **options):
        latents = self.latents if latents is None else latents
        guider = LTCFGGuider.execute(
            model=self.patcher,
            positive=[[self.positive, {}]],
            negative=[[self.negative, {}]],
            cfg=cfg,
            **{**OPTIONS, **options},
        ).result[0]
        sampler = sampler or comfy.samplers.sampler_object("euler")
        out = guider.sample(
            latents.clone(), torch.zeros_like(latents), sampler, sigmas, seed=0, disable_pbar=True
        )
        return self.patcher.model.latent_format.process_in(out)


@pytest.fixture(scope="module")
def lumina2():
    from diffusers import Lumina2Pipeline

    return Family(Lumina2Pipeline, "lumina2")


@pytest.fixture(scope="module")
def zimage():
    from diffusers import ZImagePipeline

    return Family(ZImagePipeline, "zimage")


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("cfg_trunc_ratio", [1.0, 0.25])
@pytest.mark.parametrize("cfg_normalization", [False, True])
def test_lumina2_pipeline_parity(lumina2, cfg_trunc_ratio, cfg_normalization):
    # diffusers masks the padded negative tokens; ComfyUI receives only the valid ones
    negative = torch.cat([lumina2.negative, torch.zeros(1, 2, lumina2.negative.shape[-1])], dim=1)
    mask = torch.ones(1, 7, dtype=torch.bool)
    negative_mask = mask.clone()
    negative_mask[:, 5:] = False
    reference = lumina2.pipe(
        prompt_embeds=lumina2.positive,
        prompt_attention_mask=mask,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=negative_mask,
        latents=lumina2.latents.clone(),
        num_inference_steps=8,
        guidance_scale=4.0,
        cfg_trunc_ratio=cfg_trunc_ratio,
        cfg_normalization=cfg_normalization,
        height=64,
        width=64,
        output_type="latent",
        return_dict=False,
    )[0]
    sigmas = lumina2.pipe.scheduler.sigmas.clone()  # shift 6, 8 steps, ends at 0
    renorm_mode = "rescale_lastdim" if cfg_normalization else "off"
    ours = lumina2.comfy(
        4.0, sigmas, renorm_mode=renorm_mode, trunc_mode="step_fraction", trunc=cfg_trunc_ratio
    )
    assert _max_diff(ours, reference) <= TOL
    # the options really matter at this scale: plain CFG without truncation lands elsewhere
    if (cfg_trunc_ratio, cfg_normalization) != (1.0, False):
        assert _max_diff(lumina2.comfy(4.0, sigmas, renorm_mode="off"), reference) > 50 * TOL


@pytest.mark.parametrize(
    "guidance_scale, cfg_truncation, cfg_normalization",
    # t_norm of the 4 steps: 0, .1, .25, .5 -- 0.3 truncates the last step, 0.2 the last two. The tiny
    # model's branches differ by ~6 % (||c - u|| / ||c||), so the 1.5 cap binds only at a large scale.
    [(3.0, 1.0, False), (3.0, 0.3, 1.0), (0.0, 1.0, False), (30.0, 0.2, 1.5)],
    ids=["cfg", "trunc+norm", "turbo", "trunc+norm1.5"],
)
def test_zimage_pipeline_parity(zimage, guidance_scale, cfg_truncation, cfg_normalization):
    reference = zimage.pipe(
        prompt_embeds=[zimage.positive[0]],
        negative_prompt_embeds=[zimage.negative[0]],
        latents=zimage.latents.clone(),
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        cfg_truncation=cfg_truncation,
        cfg_normalization=cfg_normalization,
        height=64,
        width=64,
        output_type="latent",
        return_dict=False,
    )[0]
    sigmas = zimage.pipe.scheduler.sigmas.clone()  # shift 3, 4 steps: t = 0, .1, .25, .5
    options = dict(
        cfg_formula="zimage",
        renorm_mode="cap",
        renorm=float(cfg_normalization),
        trunc_mode="zimage",
        trunc=cfg_truncation,
    )
    assert _max_diff(zimage.comfy(guidance_scale, sigmas, **options), reference) <= TOL
    # each option really acts here: without it we land well outside the tolerance (the cap binds, the
    # truncation cuts; measured: 0.35 / 0.046 for trunc+norm, 2.4 / 0.6 for trunc+norm1.5)
    if cfg_truncation < 1.0:
        untruncated = zimage.comfy(guidance_scale, sigmas, **{**options, "trunc_mode": "off"})
        assert _max_diff(untruncated, reference) > 10 * TOL
    if cfg_normalization:
        uncapped = zimage.comfy(guidance_scale, sigmas, **{**options, "renorm": 0.0})
        assert _max_diff(uncapped, reference) > 10 * TOL


# --- official Lumina-Image-2.0 NextDiT.forward_with_cfg, written from the official formula -------------------


def official_forward_with_cfg(
    transformer, x, t, cap, cap_mask, neg, neg_mask, cfg_scale, cfg_trunc, renorm_cfg, stats
):
    """One official CFG evaluation at Lumina time t (0 = noise); returns dx/dt. The official code handles one
    sample per half (``if new_pos_norm >= max_new_norm`` on a tensor), so it runs per sample here."""
    t_batch = torch.full((x.shape[0],), float(t), dtype=torch.float32)
    if not t_batch[0] < cfg_trunc:
        return transformer(x, t_batch, cap, cap_mask, return_dict=False)[0]
    cond = transformer(x, t_batch, cap, cap_mask, return_dict=False)[0]
    uncond = transformer(x, t_batch, neg, neg_mask, return_dict=False)[0]
    out = []
    for c, u in zip(cond, uncond, strict=True):
        half_eps = u + cfg_scale * (c - u)
        if float(renorm_cfg) > 0.0:
            max_new_norm = torch.linalg.vector_norm(c) * float(renorm_cfg)
            new_pos_norm = torch.linalg.vector_norm(half_eps)
            if new_pos_norm >= max_new_norm:
                half_eps = half_eps * (max_new_norm / new_pos_norm)
                stats["capped"] += 1
            else:
                stats["uncapped"] += 1
        out.append(half_eps)
    return torch.stack(out)


@torch.no_grad()
def official_sample(family, latents, sigmas, solver, **cfg_args):
    """The official ODE in Lumina t on the same grid (t = 1 - sigma): Euler, or torchdiffeq-style midpoint."""
    transformer = family.pipe.transformer
    batch = latents.shape[0]
    cap, neg = family.positive.expand(batch, -1, -1), family.negative.expand(batch, -1, -1)
    cap_mask = torch.ones(cap.shape[:2], dtype=torch.bool)
    neg_mask = torch.ones(neg.shape[:2], dtype=torch.bool)
    stats = {"capped": 0, "uncapped": 0}

    def f(x, t):
        return official_forward_with_cfg(
            transformer, x, t, cap, cap_mask, neg, neg_mask, stats=stats, **cfg_args
        )

    x = latents.clone()
    ts = 1.0 - sigmas.to(torch.float32)
    for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
        if solver == "euler":
            x = x + f(x, t0) * (t1 - t0)
        else:
            x_mid = x + f(x, t0) * (t1 - t0) / 2
            x = x + f(x_mid, (t0 + t1) / 2) * (t1 - t0)
    return x, stats


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_cap_matches_official_forward_with_cfg_batch2(lumina2, solver):
    # the grid Lumina2Pipeline builds for 8 steps (shift 6): t = 0, .023, .053, .091, .143, .217, .333, .538
    lumina2.pipe.scheduler.set_timesteps(sigmas=[1.0 - i / 8 for i in range(8)])
    sigmas = lumina2.pipe.scheduler.sigmas.clone()
    latents = torch.cat(
        [lumina2.latents, torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))]
    )
    reference, stats = official_sample(
        lumina2, latents, sigmas, solver, cfg_scale=4.0, cfg_trunc=0.3, renorm_cfg=1.0
    )
    assert stats["capped"] > 0
    sampler = (
        comfy.samplers.sampler_object("euler")
        if solver == "euler"
        else comfy.samplers.KSAMPLER(sample_flow_midpoint)
    )
    ours = lumina2.comfy(
        4.0,
        sigmas,
        latents=latents,
        sampler=sampler,
        renorm_mode="cap",
        renorm=1.0,
        trunc_mode="lumina_t",
        trunc=0.3,
    )
    assert _max_diff(ours, reference) <= TOL
    uncapped = lumina2.comfy(
        4.0, sigmas, latents=latents, sampler=sampler, renorm_mode="off", trunc_mode="lumina_t", trunc=0.3
    )
    assert _max_diff(uncapped, reference) > 50 * TOL
