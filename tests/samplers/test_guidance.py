"""CFG truncation and renormalization math (samplers/guidance.py), against hand counts and the oracle lines."""

import pytest
import torch

from lumina_turbo.samplers.flow import denoised_from_velocity, velocity_from_denoised
from lumina_turbo.samplers.guidance import (
    cfg_is_active,
    combine_cfg,
    comfy_cfg_scale,
    guided_steps,
    guided_velocity,
    renorm_cap,
    renorm_rescale_lastdim,
    step_index,
    validate_cfg,
    validate_renorm,
    validate_truncation,
)


def shifted_schedule(steps: int, shift: float) -> torch.Tensor:
    """ComfyUI-style flow schedule: uniform s from 1 to 0, shifted, float32, ending at 0."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).to(torch.float32)


# 8 linear steps: 1, .875, ..., .125, 0 -- all exact binary fractions, so boundaries are exact.
LINEAR_8 = shifted_schedule(8, 1.0)
LINEAR_30 = shifted_schedule(30, 1.0)
SHIFT6_30 = shifted_schedule(30, 6.0)
SHIFT3_8 = shifted_schedule(8, 3.0)  # Z-Image-Turbo: 1, .9545, .9, .8333, .75, .6429, .5, .3, 0


def count(mode, value, schedule):
    return sum(guided_steps(mode, value, schedule))


# --- truncation: guided-step counts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("off", 0.0, 30),
        ("step_fraction", 1.0, 30),
        ("step_fraction", 0.0, 0),
        ("step_fraction", 0.25, 7),  # (i+1)/30 <= 0.25  <=>  i+1 <= 7.5
        ("step_fraction", 7 / 30, 7),  # boundary: 7/30 <= 7/30 holds
        ("step_fraction", 7 / 30 - 1e-9, 6),
        ("lumina_t", 0.5, 15),  # t_i = i/30 < 0.5  <=>  i < 15 (t_15 = 0.5 is not < 0.5)
        ("lumina_t", 100.0, 30),  # the official default: never truncate
        ("zimage", 0.5, 16),  # t_i <= 0.5  <=>  i <= 15
        ("zimage", 1.0, 30),
        ("sigma", 0.5, 16),  # sigma_i = 1 - i/30 >= 0.5  <=>  i <= 15
        ("last_steps", 5, 25),
        ("last_steps", 0, 30),
        ("last_steps", 30, 0),
        ("last_steps", 40, 0),
    ],
)
def test_guided_step_counts_linear_30(mode, value, expected):
    assert count(mode, value, LINEAR_30) == expected


def test_guided_steps_are_a_prefix():
    for mode, value in [
        ("step_fraction", 0.25),
        ("lumina_t", 0.3),
        ("zimage", 0.3),
        ("sigma", 0.7),
        ("last_steps", 5),
    ]:
        flags = guided_steps(mode, value, SHIFT6_30)
        n = sum(flags)
        assert flags == [True] * n + [False] * (30 - n)


def test_lumina_t_on_shift6_30():
    # t < c <=> sigma > 1 - c = 0.7 <=> 6s/(1+5s) > 0.7 <=> s > 0.7/2.5 = 0.28; s_i = 1 - i/30 > 0.28 <=> i <= 21
    assert count("lumina_t", 0.3, SHIFT6_30) == 22
    assert count("zimage", 0.3, SHIFT6_30) == 22  # no schedule point sits on the boundary
    # official demo value 0.25 -> sigma > 0.75 <=> s > 1/3 <=> i < 20; sigma_20 rounds to exactly 0.75 in
    # float32, the boundary: lumina_t (t < c) leaves it out, zimage (t <= c) keeps it
    assert SHIFT6_30[20].item() == 0.75
    assert count("lumina_t", 0.25, SHIFT6_30) == 20
    assert count("zimage", 0.25, SHIFT6_30) == 21


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("off", 0.0, 8),
        ("step_fraction", 0.25, 2),  # (i+1)/8 <= 0.25  <=>  i+1 <= 2 (boundary exact)
        ("step_fraction", 0.3, 2),
        ("lumina_t", 0.25, 2),  # t_i = i/8 < 0.25  <=>  i < 2
        ("zimage", 0.25, 3),  # t_i <= 0.25  <=>  i <= 2
        ("sigma", 0.75, 3),  # sigma_i >= 0.75  <=>  i <= 2
        ("sigma", 0.0, 8),
        ("last_steps", 3, 5),
        ("last_steps", 8, 0),
    ],
)
def test_guided_step_counts_linear_8(mode, value, expected):
    assert count(mode, value, LINEAR_8) == expected


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("zimage", 0.25, 5),  # sigma_i >= 0.75: 1, .9545, .9, .8333, .75
        ("lumina_t", 0.25, 4),  # sigma_i > 0.75
        ("sigma", 0.8, 4),
        ("step_fraction", 0.5, 4),
        ("last_steps", 2, 6),
    ],
)
def test_guided_step_counts_zimage_turbo_8(mode, value, expected):
    assert count(mode, value, SHIFT3_8) == expected


def test_nfe_accounting_step_fraction_quarter_30_steps_euler():
    flags = guided_steps("step_fraction", 0.25, SHIFT6_30)
    assert sum(flags) == 7
    batch_rows = sum(2 if guided else 1 for guided in flags)
    assert batch_rows == 37  # instead of 60 with CFG on every step


# --- truncation: against the oracle code's own lines ----------------------------------------------------


def test_step_fraction_matches_diffusers_lumina2_loop():
    for n in (1, 7, 8, 30, 50):
        schedule = shifted_schedule(n, 6.0)
        for ratio in (0.0, 0.1, 0.25, 1 / 3, 0.5, 0.99, 1.0):
            expected = [not ((i + 1) / n > ratio) for i in range(n)]  # do_classifier_free_truncation
            assert guided_steps("step_fraction", ratio, schedule) == expected


def test_zimage_matches_diffusers_zimage_t_norms():
    from diffusers import FlowMatchEulerDiscreteScheduler  # the oracle is a pinned test dependency

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / 8, 8).tolist())  # get_default_z_image_sigmas(8)
    t_norms = ((1000 - scheduler.timesteps.float()) / 1000).tolist()
    for truncation in (0.0, 0.05, 0.1, 0.25, 0.5, 0.7, 0.9, 1.0):
        expected = [not (t_norm > truncation) for t_norm in t_norms]
        assert guided_steps("zimage", truncation, scheduler.sigmas) == expected


def test_lumina_t_compares_like_official_float32_tensor():
    # forward_with_cfg: `if t[0] < cfg_trunc` with t a float32 tensor -> compared in float32
    for sigma in torch.linspace(0.0, 1.0, 101, dtype=torch.float32):
        t = 1.0 - sigma.reshape(1)
        for cfg_trunc in (0.25, 0.3, 0.7, 1.0):
            assert cfg_is_active("lumina_t", cfg_trunc, sigma, LINEAR_30) == bool(t[0] < cfg_trunc)


# --- step lookup off the schedule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sigma, expected",
    [
        (1.0, 0),
        (0.9999, 0),  # SDE samplers: offset_first_sigma_for_snr replaces 1.0
        (1.05, 0),  # above the first point
        (0.875, 1),
        (0.8749, 1),  # just below a point: still the step that started at 0.875
        (0.6875, 2),  # midpoint of step 2 (0.75 -> 0.625)
        (0.74, 2),
        (0.625 * 1.01, 3),  # s_churn sigma_hat slightly above 0.625 -> step 3
        (0.625 + 0.2 * 0.125 + 1e-6, 2),  # beyond the tolerance: a sub-step of step 2
        (0.625, 3),  # by sigma alone heun's corrector of step 2 looks like step 3's first call
        (0.0625, 7),
        (0.0, 7),
    ],
)
def test_step_index_off_schedule(sigma, expected):
    assert step_index(sigma, LINEAR_8) == expected
    assert step_index(torch.full((2,), sigma), LINEAR_8) == expected  # the per-row timestep tensor


def test_step_index_on_every_point_of_shifted_schedule():
    for i in range(30):
        assert step_index(SHIFT6_30[i], SHIFT6_30) == i
        midpoint = (SHIFT6_30[i] + SHIFT6_30[i + 1]) / 2
        assert step_index(midpoint, SHIFT6_30) == i


def test_off_schedule_calls_follow_their_step():
    # step_fraction 0.25 on 8 steps: steps 0 and 1 guided
    assert cfg_is_active("step_fraction", 0.25, 0.8125, LINEAR_8)  # midpoint of step 1
    assert not cfg_is_active("step_fraction", 0.25, 0.6875, LINEAR_8)  # midpoint of step 2
    assert not cfg_is_active("step_fraction", 0.25, 0.75 * 1.01, LINEAR_8)  # sigma_hat of step 2
    assert cfg_is_active("last_steps", 6, 0.9999, LINEAR_8)
    # zimage decides on the step's start sigma: step 2 starts at 0.75 (t = 0.25 <= 0.25) -> its midpoint too
    assert cfg_is_active("zimage", 0.25, 0.6875, LINEAR_8)
    # lumina_t decides on the call's own sigma, like the official solver's sub-steps
    assert not cfg_is_active("lumina_t", 0.3, 0.6875, LINEAR_8)  # t = 0.3125
    assert cfg_is_active("lumina_t", 0.3, 0.75, LINEAR_8)  # t = 0.25
    assert cfg_is_active("sigma", 0.7, 0.75 * 1.01, LINEAR_8)


def test_partial_schedules_count_their_own_steps():
    after_denoise = LINEAR_8[4:]  # .5, .375, .25, .125, 0: 4 steps
    assert step_index(0.375, after_denoise) == 1
    assert count("step_fraction", 0.5, after_denoise) == 2
    assert count("last_steps", 1, after_denoise) == 3
    assert count("zimage", 0.6, after_denoise) == 1  # t = .5, .625, .75, .875
    assert count("sigma", 0.3, after_denoise) == 2

    high_part = LINEAR_8[:5]  # SplitSigmas: 1, .875, .75, .625, .5 (ends above 0)
    assert step_index(0.5, high_part) == 3
    assert step_index(0.55, high_part) == 3
    assert count("last_steps", 1, high_part) == 3


def test_step_index_needs_a_step():
    with pytest.raises(ValueError, match="sample_sigmas"):
        step_index(0.5, torch.tensor([1.0]))


# --- validation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, value, message",
    [
        ("step_fraction", 1.5, r"trunc_value .*'step_fraction'.* \[0, 1\]"),
        ("step_fraction", -0.1, r"\[0, 1\]"),
        ("sigma", 2.0, r"trunc_value .*'sigma'.* \[0, 1\]"),
        ("lumina_t", -0.5, r"trunc_value .*'lumina_t'.* >= 0"),
        ("zimage", -0.01, r"trunc_value .*'zimage'.* >= 0"),
        ("last_steps", 2.5, r"trunc_value .*'last_steps'.* integer >= 0"),
        ("last_steps", -1, r"integer >= 0"),
        ("step_fraction", float("nan"), r"trunc_value must be a finite number"),
        ("step_fraction", "0.25", r"trunc_value must be a finite number"),
        ("cfg_trunc", 0.25, r"trunc_mode must be one of"),
    ],
)
def test_validate_truncation_rejects(mode, value, message):
    with pytest.raises(ValueError, match=message):
        validate_truncation(mode, value)


@pytest.mark.parametrize(
    "mode, value",
    [
        ("off", float("nan")),
        ("step_fraction", 0.25),
        ("lumina_t", 100),
        ("zimage", 1.0),
        ("sigma", 0.0),
        ("last_steps", 5.0),
    ],
)
def test_validate_truncation_accepts(mode, value):
    validate_truncation(mode, value)


def test_validate_cfg_and_renorm():
    validate_cfg(0.0)
    validate_cfg(4.0, "zimage")
    with pytest.raises(ValueError, match=r"cfg must be >= 0, got -1"):
        validate_cfg(-1)
    with pytest.raises(ValueError, match=r"cfg must be a finite number"):
        validate_cfg(float("inf"))
    with pytest.raises(ValueError, match=r"cfg_formula must be one of"):
        validate_cfg(4.0, "diffusers")
    validate_renorm("cap", 0.0)
    validate_renorm("rescale_lastdim", -3.0)  # unused there
    with pytest.raises(ValueError, match=r"renorm must be >= 0 \(0 = off\)"):
        validate_renorm("cap", -1.0)
    with pytest.raises(ValueError, match=r"renorm_mode must be one of"):
        validate_renorm("global", 1.0)


# --- guided velocity ------------------------------------------------------------------------------------


def sample_norms(v):
    return v.flatten(1).norm(dim=1)


def test_cfg_formulas():
    c, u = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    assert torch.equal(combine_cfg(c, u, 4.0, "comfy"), u + 4.0 * (c - u))
    assert torch.equal(combine_cfg(c, u, 3.0, "zimage"), c + 3.0 * (c - u))
    torch.testing.assert_close(combine_cfg(c, u, 3.0, "zimage"), combine_cfg(c, u, 4.0, "comfy"))
    assert comfy_cfg_scale(3.0, "zimage") == 4.0
    assert comfy_cfg_scale(4.0) == 4.0


def test_cap_never_scales_up():
    c = torch.randn(1, 16, 8, 8)
    small = 0.5 * c + 0.01 * torch.randn_like(c)  # norm well below ||c||
    assert torch.equal(renorm_cap(small, c, 1.0), small)


def test_cap_caps_exactly_and_keeps_direction():
    c = torch.randn(1, 16, 8, 8)
    big = 3.0 * torch.randn_like(c)
    for renorm in (0.5, 1.0, 2.0):
        capped = renorm_cap(big, c, renorm)
        torch.testing.assert_close(sample_norms(capped), renorm * sample_norms(c))
        cosine = torch.nn.functional.cosine_similarity(capped.flatten(1), big.flatten(1))
        torch.testing.assert_close(cosine, torch.ones(1))
    assert torch.equal(renorm_cap(big, c, 0.0), big)  # 0 = off


def official_lumina2_renorm(cond_eps, uncond_eps, cfg_scale, renorm_cfg):
    """The lines of Lumina-Image-2.0 NextDiT.forward_with_cfg, for one sample per half."""
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    if float(renorm_cfg) > 0.0:
        ori_pos_norm = torch.linalg.vector_norm(
            cond_eps, dim=tuple(range(1, len(cond_eps.shape))), keepdim=True
        )
        max_new_norm = ori_pos_norm * float(renorm_cfg)
        new_pos_norm = torch.linalg.vector_norm(
            half_eps, dim=tuple(range(1, len(half_eps.shape))), keepdim=True
        )
        if new_pos_norm >= max_new_norm:
            half_eps = half_eps * (max_new_norm / new_pos_norm)
    return half_eps


def zimage_renorm(pos, neg, guidance, cfg_normalization):
    """The lines of diffusers ZImagePipeline's CFG loop, for one sample (no batch dim)."""
    pred = pos + guidance * (pos - neg)
    if cfg_normalization and float(cfg_normalization) > 0.0:
        ori_pos_norm = torch.linalg.vector_norm(pos)
        new_pos_norm = torch.linalg.vector_norm(pred)
        max_new_norm = ori_pos_norm * float(cfg_normalization)
        if new_pos_norm > max_new_norm:
            pred = pred * (max_new_norm / new_pos_norm)
    return pred


def test_batch_of_two_one_capped_one_not_matches_official_per_sample():
    torch.manual_seed(0)
    c = torch.randn(2, 16, 6, 6)
    u = c.clone()
    u[0] = c[0] - torch.randn(16, 6, 6)  # strong guidance: sample 0 exceeds the cap
    u[1] = c[1] + 0.05 * c[1]  # guided = c - 0.2c: sample 1 stays below ||c||
    out = guided_velocity(c, u, 4.0, renorm_mode="cap", renorm=1.0)
    guided = combine_cfg(c, u, 4.0)
    assert sample_norms(guided)[0] > sample_norms(c)[0] and sample_norms(guided)[1] < sample_norms(c)[1]
    torch.testing.assert_close(sample_norms(out)[0], sample_norms(c)[0])
    assert torch.equal(out[1], guided[1])
    for b in range(2):
        torch.testing.assert_close(
            out[b : b + 1], official_lumina2_renorm(c[b : b + 1], u[b : b + 1], 4.0, 1.0)
        )
        zimage = zimage_renorm(c[b], u[b], 3.0, 1.0)
        torch.testing.assert_close(guided_velocity(c, u, 3.0, cfg_formula="zimage")[b], zimage)


def test_cap_on_video_shapes_is_global_per_sample():
    c, u = torch.randn(2, 4, 3, 5, 6), torch.randn(2, 4, 3, 5, 6)
    out = guided_velocity(c, u, 6.0, renorm=1.5)
    for b in range(2):
        torch.testing.assert_close(
            out[b : b + 1], official_lumina2_renorm(c[b : b + 1], u[b : b + 1], 6.0, 1.5)
        )


def diffusers_lumina2_cfg(noise_pred_cond, noise_pred_uncond, guidance_scale):
    """The lines of diffusers Lumina2Pipeline (cfg_normalization=True) on transformer outputs."""
    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
    cond_norm = torch.norm(noise_pred_cond, dim=-1, keepdim=True)
    noise_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
    noise_pred = noise_pred * (cond_norm / noise_norm)
    return -noise_pred  # the pipeline negates before scheduler.step: this is ComfyUI's v


@pytest.mark.parametrize("shape", [(2, 16, 8, 12), (2, 4, 3, 5, 6)])
def test_rescale_lastdim_matches_diffusers_lines(shape):
    v_cond, v_uncond = torch.randn(shape), torch.randn(shape)
    # the transformer outputs x0 - eps = -v
    expected = diffusers_lumina2_cfg(-v_cond, -v_uncond, 4.0)
    out = guided_velocity(v_cond, v_uncond, 4.0, renorm_mode="rescale_lastdim")
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.norm(dim=-1), v_cond.norm(dim=-1))


def test_rescale_lastdim_scales_up_too_and_survives_zero_rows():
    c = torch.randn(1, 2, 3, 4)
    guided = 0.1 * c
    torch.testing.assert_close(renorm_rescale_lastdim(guided, c), c)
    guided[0, 0, 0] = 0.0
    assert torch.isfinite(renorm_rescale_lastdim(guided, c)).all()


def test_combination_is_per_sample_scale_invariant():
    # lets a guider work on x - denoised = sigma * v without dividing by sigma
    c, u = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    s = torch.tensor([0.3, 0.9]).view(2, 1, 1, 1)
    for mode, renorm in (("off", 0.0), ("cap", 1.0), ("cap", 0.5), ("rescale_lastdim", 0.0)):
        scaled = guided_velocity(s * c, s * u, 5.0, renorm_mode=mode, renorm=renorm)
        torch.testing.assert_close(scaled, s * guided_velocity(c, u, 5.0, renorm_mode=mode, renorm=renorm))


def test_velocity_denoised_round_trip_per_sample_sigma():
    x, denoised = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    sigma = torch.tensor([0.25, 0.8])
    v = velocity_from_denoised(x, denoised, sigma)
    torch.testing.assert_close(v[1], (x[1] - denoised[1]) / 0.8)
    torch.testing.assert_close(denoised_from_velocity(x, v, sigma), denoised)
    torch.testing.assert_close(denoised_from_velocity(x, v[:, :], 0.5), x - 0.5 * v)
    with pytest.raises(ValueError, match="sigma"):
        velocity_from_denoised(x, denoised, torch.tensor([0.1, 0.2, 0.3]))


def test_bfloat16_keeps_dtype_and_caps():
    c = torch.randn(2, 16, 8, 8).bfloat16()
    u = torch.randn(2, 16, 8, 8).bfloat16()
    out = guided_velocity(c, u, 4.0)
    assert out.dtype == torch.bfloat16
    ratio = sample_norms(out.float()) / sample_norms(c.float())
    assert (ratio < 1.01).all()


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="v_cond and v_uncond"):
        guided_velocity(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 3), 4.0)
