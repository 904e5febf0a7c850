"""Fitting a :class:`FittedSampler` to one denoiser: the step times and the bespoke corrections (no comfy import).

Time convention: **ComfyUI sigma**, 1 = noise, 0 = data (see samplers/fitted_sampler.py); ``denoise(x, sigma)``
returns the x0 prediction of a batch, ``sigma`` a [B] tensor.

The objective is the mean relative terminal error against a fine-step reference from the same noise. The
bespoke corrections start at 0 (the base solver) and stay there for the first quarter of the iterations (the
schedule is fitted first), then move with steps sized to the error left (ramped up from 0), are pulled back
to 0 by weight decay, and the iterate kept is the one with the lowest error on a validation split of the
calibration noise that the optimiser never saw, so the fit can only end at or below its starting schedule on
that split.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from .fitted_sampler import (
    CORRECTED_TERMS,
    CORRECTION_TERMS,
    ORDER,
    FittedSampler,
    check_fit,
    check_solver,
    relative_error,
    run_solver,
)
from .flow import time_shift
from .schedules import check_sigmas, check_steps

# Shifts tried on the starting schedule (time_shift composes: shift a then b = shift a*b): the fit starts
# from the one best on the calibration noise, so a model whose default shift is far off is not stuck near it.
START_SHIFT_FACTORS = (1 / 3, 1 / 2, 1.0, 2.0, 3.0)
MIN_INTERVAL = 1e-4  # of a fitted schedule: no interior sigma at (or rounded to) 0
REFERENCE_STEPS = 64  # midpoint intervals of the fine-step reference solve (2 calls each)
# Settling from a last iterate that wandered this far above the best one (validation error) would refine
# the wander: the settling starts from the best iterate instead.
SETTLE_FROM_BEST_ABOVE = 1.25


def reference_solution(denoise, noise: torch.Tensor, steps: int = REFERENCE_STEPS, chunk: int | None = None):
    """A fine-step solve from ``noise`` at sigma 1 to sigma 0 (ComfyUI sigma): ``steps`` midpoint intervals.

    The intervals are uniform in sigma with the ends refined (a sigmoid warp) where flows bend most.
    Costs ``2 * steps`` model calls per sample.
    """
    from .schedules import sigmoid_sigmas

    sigmas = sigmoid_sigmas(steps, slope=3.0).to(torch.float64)
    chunk = chunk or noise.shape[0]
    with torch.no_grad():
        parts = [run_solver(denoise, part, sigmas.to(part.dtype), "midpoint") for part in noise.split(chunk)]
    return torch.cat(parts)


def _shifted(sigmas: torch.Tensor, factor: float) -> torch.Tensor:
    shifted = time_shift(sigmas, factor).clone()  # a new tensor even at factor 1 (may be an inference one)
    shifted[0], shifted[-1] = 1.0, 0.0  # the formula can miss the ends by an ulp
    return check_sigmas(shifted, "shifted start_sigmas")


def _initial_logits(start: torch.Tensor) -> torch.Tensor:
    # sigma_i = 1 - cumsum(increments)[: i], increments = floor + (1 - n floor) softmax(logits): any logits
    # give a strictly descending 1 -> 0 schedule whose interior never reaches sigma 0 (the model's edge).
    intervals = start[:-1] - start[1:]
    share = (intervals - MIN_INTERVAL) / (1.0 - intervals.numel() * MIN_INTERVAL)
    return torch.log(share.clamp_min(1e-12))


def _sigmas_from_logits(logits: torch.Tensor) -> torch.Tensor:
    increments = MIN_INTERVAL + (1.0 - logits.numel() * MIN_INTERVAL) * torch.softmax(logits, dim=0)
    cumulative = torch.cumsum(increments, dim=0)
    return torch.cat([cumulative.new_ones(1), 1.0 - cumulative[:-1], cumulative.new_zeros(1)])


def _check_positive_int(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, Real) or value != int(value) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
    return int(value)


def _check_nonnegative(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class _CountingDenoiser:
    def __init__(self, denoise):
        self.denoise = denoise
        self.calls = 0
        self.samples = 0

    def __call__(self, x, sigma):
        self.calls += 1
        self.samples += x.shape[0]
        return self.denoise(x, sigma)


def fit_sampler(
    denoise,
    noise: torch.Tensor,
    steps: int,
    *,
    solver: str = "multistep",
    fit: str = "bespoke",
    reference: torch.Tensor | None = None,
    start_sigmas: torch.Tensor | None = None,
    seed: int = 0,
    iterations: int = 300,
    validation_fraction: float = 0.25,
    learning_rate: float = 0.05,
    weight_decay: float = 1e-3,
    chunk: int | None = None,
    progress=None,
    schedule_only_fraction: float = 0.25,
    correction_step: float = 0.5,
    correction_warmup: float = 0.2,
    start_shift_factors: tuple[float, ...] = START_SHIFT_FACTORS,
    robust_quantile: float = 1.0,
    samples_per_iteration: int | None = None,
    euler_at_final: bool | None = None,
    restarts: int = 1,
    settle_iterations: int = 0,
) -> FittedSampler:
    """Fit ``steps`` intervals of ``solver`` to ``denoise`` on the calibration ``noise`` (at sigma 1).

    Time convention: ComfyUI sigma (1 = noise, 0 = data); ``denoise(x, sigma)`` returns the x0 prediction
    of a batch, sigma a [B] tensor; it must be differentiable in x (its weights may be frozen).

    The objective is the mean per-sample relative terminal error (:func:`relative_error`) against
    ``reference``, the sigma-0 endpoints of ``noise`` (None: computed by :func:`reference_solution`).
    ``robust_quantile`` < 1 caps each sample's error at the previous iteration's quantile of them, so the
    few noises near a boundary between modes (which a few-step solver sends to one side or the other)
    pull no harder than the rest; it narrows the gap between calibration and held-out error but raised
    the held-out error itself on the benchmark, hence off by default. Reported errors are plain means.
    ``fit="steps"`` fits only the sigmas (monotone by construction: softmax increments, endpoints 1 and 0
    fixed); ``"bespoke"`` also fits the per-step corrections of the solver's coefficients, with
    ``weight_decay`` pulling them back to the base solver; they move only after the first
    ``schedule_only_fraction`` of the iterations (the sigmas alone first), with a learning rate of
    ``correction_step`` times the validation error reached by then, ramped up linearly from 0 over the
    next ``correction_warmup`` of the iterations (Adam's first steps move every correction by the full
    rate at once, which on flows with sharp modes sends many noises to another mode in a single step).
    A random ``validation_fraction`` of the noise (split by ``seed``) is held out of the optimisation;
    the iterate with the lowest validation error is returned (the start included). Adam with
    ``learning_rate`` (cosine decay), the gradient norms of the sigmas and of the corrections clipped
    apart; a non-finite step is undone and the learning rate halved. ``chunk`` bounds the batch of one
    model call.
    ``start_sigmas``: the starting schedule (default uniform; pass the model's own); the fit starts from
    whichever of its time shifts by ``start_shift_factors`` has the lowest calibration error (``()``: as
    given). ``samples_per_iteration``: each iteration's gradient comes from that many calibration samples
    drawn afresh (None: all of them), so a large calibration set, which the rare noises near a boundary
    between modes need to be represented, costs no more per iteration. ``euler_at_final`` (multistep
    solvers): whether the interval to sigma 0 is first order (see :func:`run_solver`); None fits the
    schedule alone both ways for the first ``schedule_only_fraction`` of the iterations and goes on with
    the way better on the validation split (``report["final_step_validation_errors"]``), which costs
    that fraction of the iterations once more. ``restarts`` > 1 runs that many whole fits (seeds ``seed``,
    ``seed + 1``, ...: other splits and draws) and keeps the one with the lowest error on all the calibration
    noise; on flows with sharp modes one fit can settle far from another, and this costs ``restarts`` times
    the fit. ``settle_iterations``: that many more iterations after ``iterations`` at the learning rate the
    cosine ended on (1/20 of the start), from the last iterate or, if that one's validation error is over
    ``SETTLE_FROM_BEST_ABOVE`` times the best one's, from the best; the first ``iterations`` are unchanged
    by them, so the fit can only end at or below its error without them on the validation split. Where the
    fits of one model land far apart from seed to seed (sharp modes), the corrections settle there where a
    longer cosine, which spends its extra iterations at high rates, did not. ``progress(done, total)`` is
    called once per iteration.

    The returned sampler's ``report`` holds the calibration (optimised part), validation, whole-noise
    (``noise_error``, what restarts are chosen by) and starting errors and the cost: model calls and sample
    evaluations of the reference and of the fit (a backward pass costs about two more forward passes).
    """
    steps = check_steps(steps)
    check_solver(solver)
    check_fit(fit)
    iterations = _check_positive_int(iterations, "iterations", low=0)
    restarts = _check_positive_int(restarts, "restarts")
    settle_iterations = _check_positive_int(settle_iterations, "settle_iterations", low=0)
    weight_decay = _check_nonnegative(weight_decay, "weight_decay")
    if samples_per_iteration is not None:
        samples_per_iteration = _check_positive_int(samples_per_iteration, "samples_per_iteration")
    learning_rate = _check_nonnegative(learning_rate, "learning_rate")
    if not isinstance(noise, torch.Tensor) or noise.ndim < 2 or noise.shape[0] < 2:
        raise ValueError("noise must be a batch tensor [B, ...] of at least 2 calibration samples")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise must be finite")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction!r}")
    if not 0.0 <= schedule_only_fraction <= 1.0:
        raise ValueError(f"schedule_only_fraction must lie in [0, 1], got {schedule_only_fraction!r}")
    correction_step = _check_nonnegative(correction_step, "correction_step")
    if not 0.0 <= correction_warmup <= 1.0:
        raise ValueError(f"correction_warmup must lie in [0, 1], got {correction_warmup!r}")
    if not 0.0 < robust_quantile <= 1.0:
        raise ValueError(f"robust_quantile must lie in (0, 1], got {robust_quantile!r}")
    if any(not (isinstance(f, Real) and math.isfinite(f) and f > 0) for f in start_shift_factors):
        raise ValueError(f"start_shift_factors must be finite numbers > 0, got {start_shift_factors!r}")
    if start_sigmas is None:
        start_sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    start_sigmas = check_sigmas(start_sigmas.detach().to(torch.float64).cpu(), "start_sigmas")
    if start_sigmas.numel() != steps + 1:
        raise ValueError(f"start_sigmas must have steps + 1 = {steps + 1} values, got {start_sigmas.numel()}")

    counted = _CountingDenoiser(denoise)
    chunk = _check_positive_int(chunk, "chunk") if chunk is not None else noise.shape[0]
    if reference is None:
        reference = reference_solution(counted, noise, chunk=chunk)
    elif reference.shape != noise.shape:
        raise ValueError(
            f"reference must have the noise's shape {tuple(noise.shape)}, got {tuple(reference.shape)}"
        )
    reference_cost = {"calls": counted.calls, "samples": counted.samples}
    counted.calls = counted.samples = 0
    if restarts > 1:
        return _fit_restarts(
            counted,
            noise,
            steps,
            restarts=restarts,
            reference=reference,
            reference_cost=reference_cost,
            seed=seed,
            iterations=iterations,
            progress=progress,
            chunk=chunk,
            solver=solver,
            fit=fit,
            start_sigmas=start_sigmas,
            validation_fraction=validation_fraction,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            schedule_only_fraction=schedule_only_fraction,
            correction_step=correction_step,
            correction_warmup=correction_warmup,
            start_shift_factors=start_shift_factors,
            robust_quantile=robust_quantile,
            samples_per_iteration=samples_per_iteration,
            euler_at_final=euler_at_final,
            settle_iterations=settle_iterations,
        )
    if euler_at_final is None:
        if ORDER.get(solver, 1) < 2 or steps < 2 or iterations < 2:
            euler_at_final = True  # no extrapolation to the final sigma to choose
        else:
            return _fit_choosing_final_step(
                counted,
                noise,
                steps,
                fit=fit,
                reference=reference,
                reference_cost=reference_cost,
                start_sigmas=start_sigmas,
                iterations=iterations,
                schedule_only_fraction=schedule_only_fraction,
                start_shift_factors=start_shift_factors,
                progress=progress,
                solver=solver,
                seed=seed,
                validation_fraction=validation_fraction,
                learning_rate=learning_rate,
                weight_decay=weight_decay,
                chunk=chunk,
                correction_step=correction_step,
                correction_warmup=correction_warmup,
                robust_quantile=robust_quantile,
                samples_per_iteration=samples_per_iteration,
                settle_iterations=settle_iterations,
            )

    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(noise.shape[0], generator=generator).to(noise.device)
    held = max(1, round(validation_fraction * noise.shape[0]))
    validation, calibration = order[:held], order[held:]
    dtype, device = noise.dtype, noise.device

    def error(indices, sigmas, coefficients) -> torch.Tensor:
        values = []
        for part in indices.split(chunk):
            x = run_solver(counted, noise[part], sigmas, solver, coefficients, euler_at_final=euler_at_final)
            values.append(relative_error(x, reference[part]))
        return torch.cat(values).mean()

    def start_error(sigmas) -> float:
        with torch.no_grad():
            return float(error(calibration, sigmas.to(device=device, dtype=dtype), None))

    candidates = [_shifted(start_sigmas, factor) for factor in start_shift_factors] or [start_sigmas]
    start_errors = [start_error(c) for c in candidates]
    chosen = min(range(len(candidates)), key=start_errors.__getitem__)
    start_sigmas = candidates[chosen]
    logits = _initial_logits(start_sigmas).to(device=device, dtype=dtype).requires_grad_(True)
    corrections = torch.zeros(
        steps, CORRECTION_TERMS, dtype=dtype, device=device, requires_grad=fit == "bespoke"
    )
    mask = torch.tensor(CORRECTED_TERMS[solver], dtype=dtype, device=device)
    parameters = [{"params": [logits], "lr": learning_rate}]
    if fit == "bespoke":
        parameters.append({"params": [corrections], "lr": 0.0})  # set when they start to move

    def evaluate(indices) -> float:
        with torch.no_grad():
            return float(error(indices, _sigmas_from_logits(logits), corrections * mask))

    cap = None  # per-sample error cap: the previous iteration's robust_quantile of the errors
    optimizer = torch.optim.Adam(parameters)
    schedule_only = int(iterations * schedule_only_fraction)
    schedule_rate, correction_rate = _rate_factors(iterations, schedule_only, correction_warmup * iterations)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [schedule_rate, correction_rate] if fit == "bespoke" else schedule_rate
    )
    best_validation = evaluate(validation)
    start_validation = best_validation
    start_calibration = evaluate(calibration)
    best = (logits.detach().clone(), corrections.detach().clone(), 0)
    undone = 0
    last_validation = best_validation
    settled_from_best = False
    total_iterations = iterations + settle_iterations
    for iteration in range(1, total_iterations + 1):
        if iteration == iterations + 1 and last_validation > SETTLE_FROM_BEST_ABOVE * best_validation:
            _restore(best, logits, corrections)
            settled_from_best = True
        optimizer.zero_grad(set_to_none=True)
        errors = []
        batch = calibration
        if samples_per_iteration is not None and samples_per_iteration < calibration.numel():
            drawn = torch.randperm(calibration.numel(), generator=generator)[:samples_per_iteration]
            batch = calibration[drawn.to(calibration.device)]
        with torch.enable_grad():
            penalty = weight_decay * (corrections * mask).square().sum()
            total = penalty.detach()
            for part in batch.split(chunk):
                # a fresh graph per chunk: backward frees the previous one
                x = run_solver(
                    counted,
                    noise[part],
                    _sigmas_from_logits(logits),
                    solver,
                    corrections * mask,
                    euler_at_final=euler_at_final,
                )
                per_sample = relative_error(x, reference[part])
                if robust_quantile < 1.0:
                    errors.append(per_sample.detach())
                if cap is not None:
                    per_sample = torch.minimum(per_sample, cap)
                loss = per_sample.sum() / batch.numel()
                loss.backward()
                total = total + loss.detach()
            if fit == "bespoke":
                penalty.backward()
        if robust_quantile < 1.0:
            cap = torch.cat(errors).quantile(robust_quantile)
        grads = [p.grad for p in (logits, corrections) if p.grad is not None]
        if not all(bool(torch.isfinite(g).all()) for g in grads) or not math.isfinite(float(total.detach())):
            _restore(best, logits, corrections)
            undone += 1
            for group in optimizer.param_groups:
                group["lr"] /= 2
            scheduler.base_lrs = [lr / 2 for lr in scheduler.base_lrs]
            continue
        if iteration <= schedule_only:
            corrections.grad = None  # the schedule alone first, so the corrections start from a fitted one
        elif iteration == schedule_only + 1 and len(scheduler.base_lrs) > 1:
            # A correction of size c moves the relative terminal error by about c: steps sized to the
            # error still to remove (not to the O(1) coefficients) neither stall at 4 steps nor
            # overshoot at 16.
            scheduler.base_lrs[1] = correction_step * best_validation
            optimizer.param_groups[1]["lr"] = scheduler.base_lrs[1] * scheduler.lr_lambdas[1](iteration - 1)
        for parameter in (
            logits,
            corrections,
        ):  # apart: large correction gradients must not starve the logits
            if parameter.grad is not None:
                torch.nn.utils.clip_grad_norm_([parameter], max_norm=1.0)
        optimizer.step()
        scheduler.step()
        validation_error = last_validation = evaluate(validation)
        if math.isfinite(validation_error) and validation_error < best_validation:
            best_validation = validation_error
            best = (logits.detach().clone(), corrections.detach().clone(), iteration)
        if progress is not None:
            progress(iteration, total_iterations)

    _restore(best, logits, corrections)
    calibration_error = evaluate(calibration)
    fit_cost = {"calls": counted.calls, "samples": counted.samples}
    with torch.no_grad():
        sigmas = _sigmas_from_logits(logits).detach().to(torch.float64).cpu()
    sigmas[0], sigmas[-1] = 1.0, 0.0
    result = FittedSampler(
        sigmas=check_sigmas(sigmas, "fitted sigmas"),
        solver=solver,
        fit=fit,
        corrections=(corrections * mask).detach().to(torch.float64).cpu(),
        euler_at_final=euler_at_final,
    )
    result.report = {
        "steps": steps,
        "model_calls": result.model_calls,
        "calibration_samples": int(calibration.numel()),
        "validation_samples": int(validation.numel()),
        # all the noise: the optimised part's and the held-back part's means, weighted
        "noise_error": (calibration_error * calibration.numel() + best_validation * validation.numel())
        / noise.shape[0],
        "start_shift_factor": float(start_shift_factors[chosen]) if start_shift_factors else 1.0,
        "start_calibration_error": start_calibration,
        "start_validation_error": start_validation,
        "calibration_error": calibration_error,
        "validation_error": best_validation,
        "best_iteration": best[2],
        "iterations": iterations,
        "settle_iterations": settle_iterations,
        "settled_from_best": settled_from_best,
        "undone_steps": undone,
        "seed": int(seed),
        "reference_cost": reference_cost,
        "fit_cost": fit_cost,
    }
    return result


def _fit_choosing_final_step(
    counted,
    noise,
    steps,
    *,
    fit,
    reference,
    reference_cost,
    start_sigmas,
    iterations,
    schedule_only_fraction,
    start_shift_factors,
    progress,
    correction_warmup,
    settle_iterations,
    **options,
) -> FittedSampler:
    """fit_sampler with ``euler_at_final=None``: the schedule alone is fitted both ways for the first
    ``schedule_only_fraction`` of the iterations, and the full fit goes on from the one with the lower
    validation error for the rest and the settling ones (the probes cost that fraction once more)."""
    probe_iterations = max(1, int(iterations * schedule_only_fraction))
    total = 2 * probe_iterations + iterations - probe_iterations + settle_iterations

    def reporting(offset):
        return None if progress is None else lambda done, _: progress(offset + done, total)

    probes = {
        choice: fit_sampler(
            counted,
            noise,
            steps,
            fit="steps",
            reference=reference,
            start_sigmas=start_sigmas,
            iterations=probe_iterations,
            start_shift_factors=start_shift_factors,
            euler_at_final=choice,
            settle_iterations=0,
            progress=reporting(index * probe_iterations),
            **options,
        )
        for index, choice in enumerate((True, False))
    }
    chosen = min(probes, key=lambda choice: probes[choice].report["validation_error"])
    probe = probes[chosen].report
    result = fit_sampler(
        counted,
        noise,
        steps,
        fit=fit,
        reference=reference,
        start_sigmas=probes[chosen].sigmas,
        iterations=iterations - probe_iterations,
        schedule_only_fraction=0.0,
        start_shift_factors=(),
        euler_at_final=chosen,
        progress=reporting(2 * probe_iterations),
        # the same number of warm-up iterations as without the probes
        correction_warmup=min(1.0, correction_warmup * iterations / max(1, iterations - probe_iterations)),
        settle_iterations=settle_iterations,
        **options,
    )
    report = result.report
    best_iteration = report["best_iteration"]
    report.update(
        start_shift_factor=probe["start_shift_factor"],
        start_calibration_error=probe["start_calibration_error"],
        start_validation_error=probe["start_validation_error"],
        best_iteration=probe_iterations + best_iteration if best_iteration else probe["best_iteration"],
        iterations=iterations,
        undone_steps=probe["undone_steps"] + report["undone_steps"],
        final_step_validation_errors={
            "euler": probes[True].report["validation_error"],
            "extrapolated": probes[False].report["validation_error"],
        },
        reference_cost=reference_cost,
        fit_cost={"calls": counted.calls, "samples": counted.samples},
    )
    return result


def _fit_restarts(
    counted, noise, steps, *, restarts, reference, reference_cost, seed, iterations, progress, **options
) -> FittedSampler:
    """fit_sampler with ``restarts`` > 1: whole fits from seeds ``seed``, ``seed + 1``, ...; the one with the
    lowest error on all of ``noise`` is returned (its report lists every restart's error)."""
    fits, errors = [], []
    for index in range(restarts):

        def reporting(done, total, index=index):
            progress(index * total + done, restarts * total)

        fitted = fit_sampler(
            counted,
            noise,
            steps,
            reference=reference,
            seed=int(seed) + index,
            iterations=iterations,
            progress=None if progress is None else reporting,
            **options,
        )
        fits.append(fitted)
        errors.append(fitted.report["noise_error"])
    chosen = min(range(restarts), key=errors.__getitem__)
    result = fits[chosen]
    result.report.update(
        seed=int(seed),
        restart_seed=int(seed) + chosen,
        restart_errors=errors,
        reference_cost=reference_cost,
        fit_cost={"calls": counted.calls, "samples": counted.samples},
    )
    return result


def _rate_factors(iterations: int, schedule_only: int, warmup: float):
    """Learning-rate factors at iteration ``t`` (from 0) of the sigmas and of the corrections.

    Both decay on a cosine to 1/20 over ``iterations`` and stay there after it (the settling iterations):
    large early moves find the schedule's shape, small late ones settle it. The corrections' factor also
    ramps up linearly over the ``warmup`` iterations after ``schedule_only``.
    """

    def schedule_rate(t):
        if t >= iterations:
            return 0.05
        return 0.05 + 0.95 * (1 + math.cos(math.pi * t / iterations)) / 2

    def correction_rate(t):
        ramp = min(1.0, max(0.0, (t - schedule_only) / warmup)) if warmup > 0 else 1.0
        return schedule_rate(t) * ramp

    return schedule_rate, correction_rate


def _restore(best, logits: torch.Tensor, corrections: torch.Tensor) -> None:
    with torch.no_grad():
        logits.copy_(best[0])
        corrections.copy_(best[1])
