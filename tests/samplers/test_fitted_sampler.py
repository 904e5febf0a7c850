"""fit_sampler on exact Gaussian-mixture flows: monotone schedule, lower error, budget, JSON, errors."""

import functools
import math

import pytest
import scipy.integrate
import torch

from lumina_turbo.benchmarks.exact_flow import make_mixture, reference_solution
from lumina_turbo.samplers.fitted_sampler import (
    FittedSampler,
    _extrapolation_coefficients,
    model_calls_for,
    relative_error,
    run_solver,
)
from lumina_turbo.samplers.fitting import _rate_factors, fit_sampler
from lumina_turbo.samplers.schedules import time_shift

ITERATIONS = 60  # enough to move clearly away from the start; the benchmark runs the default


@pytest.fixture(scope="module")
def flow():
    torch.set_num_threads(1)
    mixture = make_mixture(dim=4, components=4, std_range=(0.05, 0.3), seed=5)
    calibration = torch.randn(
        1024, mixture.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    held_out = torch.randn(256, mixture.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return {
        "mixture": mixture,
        "denoise": lambda x, sigma: mixture.denoise(x, sigma),
        "calibration": calibration,
        "calibration_reference": reference_solution(mixture, calibration),
        "held_out": held_out,
        "held_out_reference": reference_solution(mixture, held_out),
    }


def _start(steps, shift=3.0):
    return time_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def _fit(flow, steps, solver, fit, seed=0, **kwargs):
    return fit_sampler(
        flow["denoise"],
        flow["calibration"],
        steps,
        solver=solver,
        fit=fit,
        reference=flow["calibration_reference"],
        start_sigmas=_start(steps),
        seed=seed,
        iterations=kwargs.pop("iterations", ITERATIONS),
        **kwargs,
    )


def _held_out_error(flow, sigmas, solver, corrections=None):
    x = run_solver(flow["denoise"], flow["held_out"], sigmas, solver, corrections)
    return float(relative_error(x, flow["held_out_reference"]).mean())


@pytest.mark.parametrize(
    ("solver", "fit", "steps"),
    [
        ("multistep3", "bespoke", 6),
        ("multistep", "bespoke", 6),
        ("euler", "steps", 5),
        ("midpoint", "bespoke", 3),
    ],
)
def test_fit_lowers_calibration_and_held_out_error(flow, solver, fit, steps):
    fitted = _fit(flow, steps, solver, fit)
    report = fitted.report
    assert report["best_iteration"] > 0
    assert report["calibration_error"] < report["start_calibration_error"]  # the chosen start (a shift)
    given = run_solver(flow["denoise"], flow["calibration"], _start(steps), solver)
    assert report["calibration_error"] < 0.8 * float(
        relative_error(given, flow["calibration_reference"]).mean()
    )
    start = _held_out_error(flow, _start(steps), solver)
    held_out = float(
        relative_error(fitted.sample(flow["denoise"], flow["held_out"]), flow["held_out_reference"]).mean()
    )
    assert held_out < 0.8 * start
    assert held_out < 1.5 * report["calibration_error"]  # no visible overfitting


def test_sigmas_monotone_endpoints_fixed_and_reproducible(flow):
    first = _fit(flow, 5, "multistep", "bespoke", seed=3, iterations=40)
    again = _fit(flow, 5, "multistep", "bespoke", seed=3, iterations=40)
    other = _fit(flow, 5, "multistep", "bespoke", seed=4, iterations=40)
    sigmas = first.sigmas
    assert sigmas.shape == (6,) and float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    assert torch.equal(first.sigmas, again.sigmas) and torch.equal(first.corrections, again.corrections)
    assert not torch.equal(first.sigmas, other.sigmas)  # the seed chooses the validation split
    assert first.fit == "bespoke" and first.corrections.abs().sum() > 0


def test_steps_fit_keeps_the_base_solver(flow):
    fitted = _fit(flow, 4, "multistep", "steps", iterations=10)
    assert torch.equal(fitted.corrections, torch.zeros(4, 4, dtype=torch.float64))


@pytest.mark.parametrize(
    ("solver", "steps", "calls"),
    [("euler", 4, 4), ("multistep", 7, 7), ("multistep3", 6, 6), ("midpoint", 5, 10)],
)
def test_sampling_costs_exactly_the_budget(flow, solver, steps, calls):
    fitted = _fit(flow, steps, solver, "bespoke", iterations=3)
    counter = {"calls": 0}

    def counted(x, sigma):
        counter["calls"] += 1
        assert sigma.shape == (x.shape[0],) and float(sigma.min()) > 0  # never at sigma 0
        return flow["denoise"](x, sigma)

    fitted.sample(counted, flow["held_out"][:8])
    assert counter["calls"] == fitted.model_calls == model_calls_for(solver, steps) == calls


SMOOTH_END = 0.25  # the order tests stop short of sigma 0: the interval to 0 is first order by design


@pytest.fixture(scope="module")
def smooth_flow():
    # Broad components keep the flow smooth, so 32-64 intervals are in the asymptotic regime.
    mixture = make_mixture(dim=4, components=3, std_range=(0.3, 0.5), seed=3)
    noise = torch.randn(64, mixture.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def velocity(sigma, flat):
        return mixture.velocity(torch.from_numpy(flat).reshape(noise.shape), sigma).reshape(-1).numpy()

    solution = scipy.integrate.solve_ivp(
        velocity, (1.0, SMOOTH_END), noise.reshape(-1).numpy(), method="DOP853", rtol=1e-11, atol=1e-11
    )
    exact = torch.from_numpy(solution.y[:, -1].copy()).reshape(noise.shape)

    def error(solver, intervals):
        sigmas = torch.linspace(1.0, SMOOTH_END, intervals + 1, dtype=torch.float64)
        return float(relative_error(run_solver(mixture.denoise, noise, sigmas, solver), exact).mean())

    return error


@pytest.mark.parametrize(("solver", "order"), [("euler", 1), ("multistep", 2), ("midpoint", 2)])
def test_base_solvers_converge_at_their_order(smooth_flow, solver, order):
    ratio = smooth_flow(solver, 32) / smooth_flow(solver, 64)
    assert 2**order * 0.8 < ratio < 2**order * 1.3


@pytest.mark.parametrize("solver", ["euler", "multistep", "multistep3"])
def test_interval_to_sigma_zero_is_first_order(solver):
    # As dpmpp_2m and lms do: extrapolating D to sigma 0, where it changes fastest, costs more than it
    # gains at few steps. The last interval returns the last prediction itself.
    predictions = iter([torch.full((2, 3), v, dtype=torch.float64) for v in (0.9, -0.4, 0.7, 0.25)])

    def denoise(x, sigma):
        return next(predictions)

    sigmas = torch.tensor([1.0, 0.7, 0.4, 0.1, 0.0], dtype=torch.float64)
    x = run_solver(denoise, torch.randn(2, 3, dtype=torch.float64), sigmas, solver)
    assert torch.equal(x, torch.full((2, 3), 0.25, dtype=torch.float64))


@pytest.mark.parametrize(
    ("sigma", "sigma_next", "sigma_prev", "sigma_prev2"), [(0.5, 0.3, 0.7, 0.9), (0.4, 0.0, 0.6, 0.85)]
)
def test_multistep3_step_is_exact_for_a_quadratic_prediction(sigma, sigma_next, sigma_prev, sigma_prev2):
    # The step integrates the flow ODE d(x/u)/du = -D(u)/u**2 exactly when D is quadratic in sigma.
    def prediction(u):
        return 0.3 + 1.7 * u - 2.1 * u * u

    def exact(x):  # x(s') = (s'/s) x - s' * integral_s^s' D(u)/u**2 du, D(0) at s' = 0
        if sigma_next == 0:
            return prediction(0.0)
        integral = scipy.integrate.quad(lambda u: prediction(u) / u**2, sigma, sigma_next, epsabs=1e-13)[0]
        return sigma_next / sigma * x - sigma_next * integral

    t = functools.partial(torch.tensor, dtype=torch.float64)
    c1, c2 = _extrapolation_coefficients(t(sigma), t(sigma_next), t(sigma_prev), t(sigma_prev2))
    d, d_prev, d_prev2 = prediction(sigma), prediction(sigma_prev), prediction(sigma_prev2)
    x = 1.234
    ratio = sigma_next / sigma
    step = ratio * x + (1 - ratio) * d + float(c1) * (d - d_prev) + float(c2) * (d_prev - d_prev2)
    assert step == pytest.approx(exact(x), abs=1e-12)


def test_multistep3_beats_multistep_on_a_smooth_flow(smooth_flow):
    # (its first two intervals are lower order, so it is not 3rd order overall)
    assert smooth_flow("multistep3", 32) < smooth_flow("multistep", 32) / 2


def test_json_round_trip(flow):
    fitted = _fit(flow, 4, "midpoint", "bespoke", iterations=5)
    restored = FittedSampler.from_json(fitted.to_json())
    assert torch.equal(restored.sigmas, fitted.sigmas) and torch.equal(
        restored.corrections, fitted.corrections
    )
    assert (restored.solver, restored.fit, restored.model_calls) == ("midpoint", "bespoke", 8)
    assert len(fitted.to_json()) < 4000
    x = flow["held_out"][:16]
    assert torch.equal(restored.sample(flow["denoise"], x), fitted.sample(flow["denoise"], x))


@pytest.mark.parametrize("euler_at_final", [True, False])
def test_json_round_trip_keeps_the_final_step(flow, euler_at_final):
    fitted = _fit(flow, 4, "multistep3", "steps", iterations=3, euler_at_final=euler_at_final)
    restored = FittedSampler.from_json(fitted.to_json())
    assert restored.euler_at_final is fitted.euler_at_final is euler_at_final
    x = flow["held_out"][:16]
    assert torch.equal(restored.sample(flow["denoise"], x), fitted.sample(flow["denoise"], x))
    data = fitted.to_dict() | {"euler_at_final": "yes"}
    with pytest.raises(ValueError, match="euler_at_final must be true or false"):
        FittedSampler.from_dict(data)


def test_fit_keeps_the_final_step_better_on_validation(flow):
    steps, iterations = 4, 20
    chosen = _fit(flow, steps, "multistep3", "bespoke", iterations=iterations)
    report = chosen.report
    errors = report["final_step_validation_errors"]
    assert chosen.euler_at_final is (errors["euler"] <= errors["extrapolated"])
    assert report["validation_error"] <= min(errors.values())  # goes on from the better probe
    # the probes repeat the schedule-only quarter (and the starting shifts) once: far less than two fits
    single = _fit(flow, steps, "multistep3", "bespoke", iterations=iterations, euler_at_final=True)
    assert 1.2 < report["fit_cost"]["samples"] / single.report["fit_cost"]["samples"] < 1.6
    # the other way, fitted alone from the same probe, is no better on validation at its probe's end
    assert min(errors.values()) == pytest.approx(
        _fit(flow, steps, "multistep3", "steps", iterations=5, euler_at_final=chosen.euler_at_final).report[
            "validation_error"
        ]
    )


def test_reference_is_computed_and_its_cost_reported(flow):
    fitted = fit_sampler(flow["denoise"], flow["calibration"][:32], 4, iterations=2, start_sigmas=_start(4))
    cost = fitted.report["reference_cost"]
    assert cost["calls"] == 128 and cost["samples"] == 128 * 32
    assert fitted.report["fit_cost"]["calls"] > 0


def test_fit_starts_from_the_best_shift_of_the_given_schedule(flow):
    given = _start(4, shift=12.0)  # far too much shift for this flow
    factors = (1 / 3, 1.0, 3.0)
    fitted = fit_sampler(
        flow["denoise"],
        flow["calibration"],
        4,
        solver="multistep3",
        fit="steps",
        reference=flow["calibration_reference"],
        start_sigmas=given,
        iterations=0,
        start_shift_factors=factors,
    )

    def calibration_error(sigmas):  # over all the calibration noise: the split is the fit's business
        x = run_solver(flow["denoise"], flow["calibration"], sigmas, "multistep3")
        return float(relative_error(x, flow["calibration_reference"]).mean())

    errors = {f: calibration_error(time_shift(given, f)) for f in factors}
    assert fitted.report["start_shift_factor"] == 1 / 3 == min(errors, key=errors.get)
    assert torch.allclose(fitted.sigmas, time_shift(given, 1 / 3), atol=1e-12)
    unshifted = fit_sampler(
        flow["denoise"], flow["calibration"][:8], 4, start_sigmas=given, iterations=0, start_shift_factors=()
    )
    assert torch.allclose(unshifted.sigmas, given, atol=1e-12)


def test_samples_per_iteration_draws_fresh_batches_at_their_cost(flow):
    def fit(**kwargs):
        return _fit(flow, 4, "multistep3", "bespoke", iterations=6, euler_at_final=True, **kwargs)

    full, drawn, again = fit(), fit(samples_per_iteration=64), fit(samples_per_iteration=64)
    optimised = full.report["calibration_samples"]
    saved = full.report["fit_cost"]["samples"] - drawn.report["fit_cost"]["samples"]
    assert saved == 6 * (optimised - 64) * 4  # 6 iterations x 4 calls: only the gradient batch shrinks
    assert torch.equal(drawn.sigmas, again.sigmas) and torch.equal(drawn.corrections, again.corrections)
    assert not torch.equal(drawn.sigmas, full.sigmas)
    assert drawn.report["validation_error"] < drawn.report["start_validation_error"]


def test_robust_objective_fits_and_reports_plain_means(flow):
    robust = _fit(flow, 5, "multistep3", "bespoke", iterations=20, robust_quantile=0.9)
    plain = _fit(flow, 5, "multistep3", "bespoke", iterations=20)
    assert not torch.equal(robust.sigmas, plain.sigmas)
    x = robust.sample(flow["denoise"], flow["calibration"])
    errors = relative_error(x, flow["calibration_reference"])
    assert robust.report["validation_error"] <= robust.report["start_validation_error"]
    assert 0 < robust.report["calibration_error"] <= float(errors.max())


def test_learning_rate_too_large_does_not_diverge(flow):
    fitted = _fit(flow, 6, "multistep", "bespoke", learning_rate=5.0, iterations=30)
    report = fitted.report
    assert math.isfinite(report["validation_error"])
    # the best iterate, start included (up to the rounding of a schedule passed from one stage to the next)
    assert report["validation_error"] <= report["start_validation_error"] * (1 + 1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be a whole number >= 1"),
        ({"solver": "rk4"}, "solver must be one of"),
        ({"fit": "everything"}, "fit must be one of"),
        ({"noise": torch.zeros(1, 4)}, "at least 2 calibration samples"),
        ({"start_sigmas": torch.tensor([1.0, 0.7, 0.8, 0.0])}, "strictly descending"),
        ({"schedule_only_fraction": 1.5}, "schedule_only_fraction must lie in"),
        ({"correction_step": -1.0}, "correction_step must be a finite number >= 0"),
        ({"correction_warmup": 1.5}, "correction_warmup must lie in"),
        ({"robust_quantile": 0.0}, "robust_quantile must lie in"),
        ({"start_shift_factors": (1.0, 0.0)}, "start_shift_factors must be finite numbers > 0"),
        ({"samples_per_iteration": 0}, "samples_per_iteration must be"),
        ({"restarts": 0}, "restarts must be a whole number >= 1"),
        ({"settle_iterations": -1}, "settle_iterations must be a whole number >= 0"),
        ({"settle_iterations": 2.5}, "settle_iterations must be a whole number >= 0"),
    ],
)
def test_bad_inputs_are_refused_by_name(flow, kwargs, message):
    arguments = {"noise": flow["calibration"][:8], "steps": 3, "iterations": 1}
    arguments.update(kwargs)
    noise, steps = arguments.pop("noise"), arguments.pop("steps")
    with pytest.raises(ValueError, match=message):
        fit_sampler(flow["denoise"], noise, steps, **arguments)


def test_nan_from_the_model_is_named(flow):
    def broken(x, sigma):
        out = flow["denoise"](x, sigma)
        return out if float(sigma[0]) > 0.5 else out * float("nan")

    with pytest.raises(ValueError, match="denoise returned NaN or inf at sigma"):
        fit_sampler(broken, flow["calibration"][:8], 4, iterations=1)


def test_k_diffusion_sampler_refuses_foreign_sigmas_only_for_bespoke(flow):
    from lumina_turbo.samplers.fitted_sampler import sample_fitted

    def model(x, sigma, **extra_args):
        return flow["denoise"](x, sigma)

    x = flow["held_out"][:8]
    bespoke = _fit(flow, 4, "multistep", "bespoke", iterations=3)
    assert torch.equal(
        sample_fitted(model, x, bespoke.sigmas, fitted=bespoke.to_dict()), bespoke.sample(flow["denoise"], x)
    )
    other = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.0], dtype=torch.float64)
    assert not torch.allclose(other, bespoke.sigmas, atol=1e-3)
    with pytest.raises(ValueError, match="sigmas: this bespoke sampler was fitted for its own 4-step sigmas"):
        sample_fitted(model, x, other, fitted=bespoke.to_dict())
    steps_only = _fit(flow, 4, "multistep", "steps", iterations=3)
    assert torch.isfinite(sample_fitted(model, x, other, fitted=steps_only.to_dict())).all()


def test_corrections_rate_ramps_up_after_the_schedule_only_part():
    schedule_rate, correction_rate = _rate_factors(iterations=100, schedule_only=25, warmup=20.0)
    assert schedule_rate(0) == 1.0 and schedule_rate(100) == pytest.approx(0.05)
    assert correction_rate(10) == correction_rate(25) == 0.0
    assert correction_rate(35) == pytest.approx(schedule_rate(35) / 2)
    assert correction_rate(45) == schedule_rate(45) and correction_rate(80) == schedule_rate(80)
    _, unramped = _rate_factors(iterations=100, schedule_only=25, warmup=0.0)
    assert unramped(26) == schedule_rate(26)
    # the settling iterations after the cosine stay at its final rate
    assert schedule_rate(100) == schedule_rate(150) == correction_rate(150) == 0.05


def test_correction_warmup_changes_the_fit_not_its_cost(flow):
    def fit(warmup):
        return _fit(
            flow, 5, "multistep3", "bespoke", iterations=20, euler_at_final=True, correction_warmup=warmup
        )

    ramped, direct = fit(0.5), fit(0.0)
    assert not torch.equal(ramped.corrections, direct.corrections)
    assert ramped.report["fit_cost"] == direct.report["fit_cost"]
    assert ramped.report["validation_error"] < ramped.report["start_validation_error"]


def test_restarts_keep_the_fit_best_on_all_the_calibration_noise(flow):
    def fit(**kwargs):
        return _fit(flow, 4, "multistep3", "bespoke", iterations=8, euler_at_final=True, **kwargs)

    seen = []
    best = fit(restarts=3, seed=5, progress=lambda done, total: seen.append((done, total)))
    singles = [fit(seed=5 + index) for index in range(3)]
    errors = []
    for single in singles:
        x = single.sample(flow["denoise"], flow["calibration"])
        errors.append(float(relative_error(x, flow["calibration_reference"]).mean()))
    chosen = min(range(3), key=errors.__getitem__)
    assert best.report["restart_errors"] == pytest.approx(errors, rel=1e-12)
    assert best.report["restart_seed"] == 5 + chosen and best.report["seed"] == 5
    assert torch.equal(best.sigmas, singles[chosen].sigmas)
    assert torch.equal(best.corrections, singles[chosen].corrections)
    assert best.report["fit_cost"]["samples"] == sum(
        single.report["fit_cost"]["samples"] for single in singles
    )
    assert seen[-1] == (24, 24) and len(seen) == 24


def test_settle_iterations_extend_the_fit_and_end_no_worse(flow):
    def fit(**kwargs):
        return _fit(flow, 5, "multistep3", "bespoke", iterations=20, seed=3, **kwargs)

    seen = []
    plain, settled = fit(), fit(settle_iterations=10, progress=lambda done, total: seen.append((done, total)))
    # the first 20 iterations are the plain fit's, so the kept iterate is at least as good on validation
    assert settled.report["validation_error"] <= plain.report["validation_error"]
    assert settled.report["settle_iterations"] == 10 and plain.report["settle_iterations"] == 0
    assert settled.report["best_iteration"] <= 30
    # 10 more iterations of the main fit (its two probes of 5 do not settle): a forward and backward run on
    # the 768 optimised samples and a validation run on the 256 held back, 5 calls each
    per_iteration = (768 + 256) * 5
    assert settled.report["fit_cost"]["samples"] - plain.report["fit_cost"]["samples"] == 10 * per_iteration
    assert seen[-1] == (35, 35) and len(seen) == 35  # two probes of 5, then 15 + 10
    again = fit(settle_iterations=10)
    assert torch.equal(again.corrections, settled.corrections) and torch.equal(again.sigmas, settled.sigmas)


def test_settling_starts_from_the_best_iterate_when_the_last_one_wandered_off(flow):
    # learning rates far above the defaults make the last iterate wander from the best one
    wandering = dict(iterations=20, seed=0, learning_rate=1.0, correction_step=8.0)
    plain = _fit(flow, 5, "multistep3", "bespoke", **wandering)
    settled = _fit(flow, 5, "multistep3", "bespoke", settle_iterations=3, **wandering)
    assert settled.report["settled_from_best"] and not plain.report["settled_from_best"]
    assert settled.report["validation_error"] <= plain.report["validation_error"]
    gentle = _fit(flow, 5, "multistep3", "bespoke", iterations=20, seed=0, settle_iterations=3)
    assert not gentle.report["settled_from_best"]
