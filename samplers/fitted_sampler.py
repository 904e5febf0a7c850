"""Few-step samplers fitted to one denoiser: the step times, and optionally a bespoke solver (no comfy import).

Time convention: **ComfyUI sigma**, 1 = noise, 0 = data, ``x_sigma = (1 - sigma) x0 + sigma noise``
(Lumina t = 1 - sigma; diffusers timestep = 1000 sigma). ``denoise(x, sigma)`` returns the x0 prediction
of a batch, ``sigma`` a [B] tensor; the flow ODE is ``dx/dsigma = (x - x0) / sigma``.

Every solver here is written in denoised form: an interval [s, s'] maps the state x and the model's
predictions D to ``x' = A x + B D + C (D - D_prev) + E (D_prev - D_prev2)``, with A, B, C, E fixed by the
base solver (Align-Your-Steps style fits change only the sigmas). The ``bespoke`` fit adds per-step
corrections (a, b, c, d) to those coefficients, in the spirit of Bespoke Solvers (Shaul et al., ICLR 2024).
They start at 0 (the base solver) and stay there for the first quarter of the iterations (the schedule is
fitted first), then move with steps sized to the error left, are pulled back to 0 by weight decay, and
the iterate kept is the one with the lowest error on a validation split of the calibration noise that the
optimiser never saw, so the fit can only end at or below its starting schedule on that split.

Solvers (``SOLVERS``):

* ``euler``: ``x' = (s'/s) x + (1 - s'/s) D``; exact when D is constant; 1 call per interval.
* ``multistep``: D extrapolated linearly in sigma from this and the previous step's prediction and the
  ODE integrated exactly over the interval (2nd order, like dpmpp_2m); 1 call per interval; its first
  interval is Euler.
* ``multistep3``: the same with the quadratic through the last three predictions (3rd order per step,
  like DEIS's polynomial extrapolation); its first two intervals are Euler and ``multistep``.
* ``midpoint``: the explicit midpoint rule of samplers/flow_solvers.py (2 calls per interval, never at
  sigma 0).

The multistep solvers' last interval, to sigma 0, is either first order (``x' = D``, as dpmpp_2m and lms
end: extrapolating D to sigma 0, where it changes fastest, costs more than it gains at few steps) or
extrapolated like the others (better once the last sigma is small); a fit tries both (``euler_at_final``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from numbers import Real

import torch

from .flow import time_shift, velocity_from_denoised
from .schedules import check_sigmas, check_steps

SOLVERS = ("euler", "multistep", "multistep3", "midpoint")
FIT_KINDS = ("steps", "bespoke")
CALLS_PER_INTERVAL = {"euler": 1, "multistep": 1, "multistep3": 1, "midpoint": 2}
ORDER = {"euler": 1, "multistep": 2, "multistep3": 3}  # degree of the D polynomial + 1 (multistep kinds)
# Which of the corrections (x, D, D - D_prev, D_prev - D_prev2) a bespoke fit of each solver may move:
# euler keeps to one prediction (else it would be a multistep method), midpoint has no D_prev2.
CORRECTION_TERMS = 4
CORRECTED_TERMS = {
    "euler": (1.0, 1.0, 0.0, 0.0),
    "multistep": (1.0, 1.0, 1.0, 0.0),
    "multistep3": (1.0, 1.0, 1.0, 1.0),
    "midpoint": (1.0, 1.0, 1.0, 0.0),
}
# Shifts tried on the starting schedule (time_shift composes: shift a then b = shift a*b): the fit starts
# from the one best on the calibration noise, so a model whose default shift is far off is not stuck near it.
START_SHIFT_FACTORS = (1 / 3, 1 / 2, 1.0, 2.0, 3.0)
MIN_INTERVAL = 1e-4  # of a fitted schedule: no interior sigma at (or rounded to) 0
REFERENCE_STEPS = 64  # midpoint intervals of the fine-step reference solve (2 calls each)
FORMAT_VERSION = 3


def model_calls_for(solver: str, steps: int) -> int:
    """Model calls of ``steps`` intervals of ``solver`` (ComfyUI sigma schedule of steps + 1 values)."""
    return CALLS_PER_INTERVAL[check_solver(solver)] * check_steps(steps)


def check_solver(solver) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    return solver


def check_fit(fit) -> str:
    if fit not in FIT_KINDS:
        raise ValueError(f"fit must be one of {FIT_KINDS}, got {fit!r}")
    return fit


def _checked_denoised(denoised: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    if not isinstance(denoised, torch.Tensor) or denoised.shape != x.shape:
        got = tuple(denoised.shape) if isinstance(denoised, torch.Tensor) else type(denoised).__name__
        raise ValueError(f"denoise must return a tensor shaped like x {tuple(x.shape)}, got {got}")
    if not bool(torch.isfinite(denoised).all()):
        raise ValueError(
            f"denoise returned NaN or inf at sigma {float(sigma.flatten()[0]):.4g}; the model (or its "
            "guidance) is not usable at this sigma"
        )
    return denoised


def _call(denoise, x: torch.Tensor, sigma) -> torch.Tensor:
    sigma_batch = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(1).expand(x.shape[0])
    return _checked_denoised(denoise(x, sigma_batch), x, sigma_batch)


def _extrapolation_coefficients(sigma, sigma_next, sigma_prev, sigma_prev2=None):
    """(C1, C2) of ``x' = (s'/s) x + (1 - s'/s) D + C1 (D - D_prev) + C2 (D_prev - D_prev2)``.

    Exact integral over [s, s'] (ComfyUI sigma) of ``d(x/u)/du = -D(u) / u**2``, i.e. the flow ODE, with
    D(u) the polynomial in sigma through the last two (``sigma_prev2`` None) or three predictions (Newton
    form ``D + k1 (u - s) + k2 (u - s)(u - s_prev)``). The limits at s' = 0 are used there (the
    logarithm's gradient at 0 would be NaN).
    """
    at_zero = float(sigma_next.detach()) == 0.0
    # -s' * integral of (u - s) / u**2 and of (u - s)(u - s_prev) / u**2 over [s, s']
    if at_zero:
        linear, quadratic = -sigma, sigma * sigma_prev
    else:
        log_ratio = torch.log(sigma_next / sigma)
        linear = -(sigma_next * log_ratio + sigma - sigma_next)
        quadratic = (
            -sigma_next * (sigma_next - sigma)
            + sigma_next * (sigma + sigma_prev) * log_ratio
            - sigma_prev * sigma_next
            + sigma * sigma_prev
        )
    c1 = linear / (sigma - sigma_prev)
    if sigma_prev2 is None:
        return c1, 0.0
    # k2 = [(D - D_prev)/(s - s_prev) - (D_prev - D_prev2)/(s_prev - s_prev2)] / (s - s_prev2)
    c1 = c1 + quadratic / ((sigma - sigma_prev) * (sigma - sigma_prev2))
    c2 = -quadratic / ((sigma_prev - sigma_prev2) * (sigma - sigma_prev2))
    return c1, c2


def run_solver(
    denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    solver: str,
    corrections: torch.Tensor | None = None,
    callback=None,
    euler_at_final: bool = True,
) -> torch.Tensor:
    """Integrate from ``sigmas[0]`` to ``sigmas[-1]`` (ComfyUI sigma, 1 = noise) with ``solver``.

    ``corrections`` ([steps, 4] or None = zeros) are the bespoke per-step additions (a, b, c, d) to the
    coefficients of x, D, (D - D_prev) and (D_prev - D_prev2); for ``midpoint`` D is the midpoint's
    prediction and D_prev the interval's first one (d unused). Differentiable in ``sigmas``,
    ``corrections`` and through ``denoise``. ``callback(i, x, denoised)`` is called once per interval
    after its first model call. ``euler_at_final``: a multistep solver's interval to sigma 0 is first
    order (``x' = D`` before corrections), as dpmpp_2m and lms end; False extrapolates there too.
    """
    steps = sigmas.numel() - 1
    order = ORDER.get(solver, 1)
    previous = []  # earlier predictions, newest last (at most two kept)
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _call(denoise, x, sigma)
        if callback is not None:
            callback(i, x, denoised)
        ratio = sigma_next / sigma
        first_order = euler_at_final and i == steps - 1 and float(sigma_next.detach()) == 0.0
        a = b = c = d = 0.0
        if corrections is not None:
            a, b, c, d = corrections[i, 0], corrections[i, 1], corrections[i, 2], corrections[i, 3]
        if solver == "midpoint":
            sigma_mid = (sigma + sigma_next) / 2
            x_mid = x + velocity_from_denoised(x, denoised, sigma) * (sigma_mid - sigma)
            denoised_mid = _call(denoise, x_mid, sigma_mid)
            x = x + velocity_from_denoised(x_mid, denoised_mid, sigma_mid) * (sigma_next - sigma)
            x = x + a * x_mid + b * denoised_mid + c * (denoised_mid - denoised)
            continue
        c1 = c2 = 0.0
        if order >= 2 and previous and not first_order:
            older_sigma = sigmas[i - 2] if order >= 3 and len(previous) == 2 else None
            c1, c2 = _extrapolation_coefficients(sigma, sigma_next, sigmas[i - 1], older_sigma)
        difference = denoised - previous[-1] if previous else 0.0
        older_difference = previous[-1] - previous[-2] if len(previous) == 2 else 0.0
        x = (ratio + a) * x + (1 - ratio + b) * denoised + (c1 + c) * difference + (c2 + d) * older_difference
        previous = [*previous[-1:], denoised]
    return x


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||x - reference|| / ||reference||`` over all but the batch dimension (at sigma 0)."""
    difference = (x - reference).flatten(1).norm(dim=1)
    return difference / reference.flatten(1).norm(dim=1).clamp_min(1e-12)


@dataclass
class FittedSampler:
    """A schedule (and for ``bespoke`` per-step corrections) fitted to one model; ComfyUI sigma, 1 = noise.

    ``sigmas``: float64 [steps + 1], strictly descending from 1 to 0. ``corrections``: [steps, 4] additions
    to the base solver's coefficients of (x, D, D - D_prev, D_prev - D_prev2), zeros for fit ``steps``. ``report``: the fit's
    errors and cost (see :func:`fit_sampler`).
    """

    sigmas: torch.Tensor
    solver: str
    fit: str
    corrections: torch.Tensor
    report: dict = field(default_factory=dict)
    euler_at_final: bool = True

    @property
    def steps(self) -> int:
        return self.sigmas.numel() - 1

    @property
    def model_calls(self) -> int:
        """Model calls of one sampling run (the budget the fit was made for)."""
        return model_calls_for(self.solver, self.steps)

    def sample(self, denoise, x: torch.Tensor, callback=None) -> torch.Tensor:
        """Sample from ``x`` at sigma 1 (pure noise) to the data estimate at sigma 0."""
        sigmas = self.sigmas.to(device=x.device, dtype=x.dtype)
        corrections = self.corrections.to(device=x.device, dtype=x.dtype)
        return run_solver(
            denoise,
            x,
            sigmas,
            self.solver,
            corrections,
            callback=callback,
            euler_at_final=self.euler_at_final,
        )

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "solver": self.solver,
            "fit": self.fit,
            "sigmas": [float(v) for v in self.sigmas.tolist()],
            "corrections": [[float(v) for v in row] for row in self.corrections.tolist()],
            "euler_at_final": self.euler_at_final,
            "report": self.report,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> FittedSampler:
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise ValueError(f"not a fitted sampler of format {FORMAT_VERSION}")
        sigmas = check_sigmas(torch.tensor(data["sigmas"], dtype=torch.float64), "fitted sigmas")
        corrections = torch.tensor(data["corrections"], dtype=torch.float64)
        if corrections.shape != (sigmas.numel() - 1, CORRECTION_TERMS) or not bool(
            torch.isfinite(corrections).all()
        ):
            raise ValueError(f"fitted corrections must be finite, one row of {CORRECTION_TERMS} per interval")
        euler_at_final = data.get("euler_at_final")
        if not isinstance(euler_at_final, bool):
            raise ValueError(f"euler_at_final must be true or false, got {euler_at_final!r}")
        return cls(
            sigmas,
            check_solver(data["solver"]),
            check_fit(data["fit"]),
            corrections,
            data.get("report", {}),
            euler_at_final,
        )

    @classmethod
    def from_json(cls, text: str) -> FittedSampler:
        return cls.from_dict(json.loads(text))


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
    start_shift_factors: tuple[float, ...] = START_SHIFT_FACTORS,
    robust_quantile: float = 1.0,
    samples_per_iteration: int | None = None,
    euler_at_final: bool | None = None,
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
    ``correction_step`` times the validation error reached by then. A random ``validation_fraction`` of the noise
    (split by ``seed``) is held out of the optimisation; the iterate with the lowest validation error is
    returned (the start included). Adam with ``learning_rate`` (cosine decay), the gradient norms of the
    sigmas and of the corrections clipped apart; a non-finite step
    is undone and the learning rate halved. ``chunk`` bounds the batch of one model call.
    ``start_sigmas``: the starting schedule (default uniform; pass the model's own); the fit starts from
    whichever of its time shifts by ``start_shift_factors`` has the lowest calibration error (``()``: as
    given). ``samples_per_iteration``: each iteration's gradient comes from that many calibration samples
    drawn afresh (None: all of them), so a large calibration set, which the rare noises near a boundary
    between modes need to be represented, costs no more per iteration. ``euler_at_final`` (multistep
    solvers): whether the interval to sigma 0 is first order (see :func:`run_solver`); None fits the
    schedule alone both ways for the first ``schedule_only_fraction`` of the iterations and goes on with
    the way better on the validation split (``report["final_step_validation_errors"]``), which costs
    that fraction of the iterations once more. ``progress(done, total)`` is called once per iteration.

    The returned sampler's ``report`` holds the calibration (optimised part), validation and starting
    errors and the cost: model calls and sample evaluations of the reference and of the fit (a backward
    pass costs about two more forward passes).
    """
    steps = check_steps(steps)
    check_solver(solver)
    check_fit(fit)
    iterations = _check_positive_int(iterations, "iterations", low=0)
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
                robust_quantile=robust_quantile,
                samples_per_iteration=samples_per_iteration,
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
    # Cosine decay to 1/20: large early moves find the schedule's shape, small late ones settle it.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.05 + 0.95 * (1 + math.cos(math.pi * t / max(iterations, 1))) / 2
    )
    schedule_only = int(iterations * schedule_only_fraction)
    best_validation = evaluate(validation)
    start_validation = best_validation
    start_calibration = evaluate(calibration)
    best = (logits.detach().clone(), corrections.detach().clone(), 0)
    history = []
    undone = 0
    for iteration in range(1, iterations + 1):
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
            history.append({"iteration": iteration, "calibration": None, "validation": None})
            continue
        if iteration <= schedule_only:
            corrections.grad = None  # the schedule alone first, so the corrections start from a fitted one
        elif iteration == schedule_only + 1 and len(scheduler.base_lrs) > 1:
            # A correction of size c moves the relative terminal error by about c: steps sized to the
            # error still to remove (not to the O(1) coefficients) neither stall at 4 steps nor
            # overshoot at 16.
            scheduler.base_lrs[1] = correction_step * best_validation
            optimizer.param_groups[1]["lr"] = scheduler.base_lrs[1] * scheduler.lr_lambdas[0](iteration - 1)
        for parameter in (
            logits,
            corrections,
        ):  # apart: large correction gradients must not starve the logits
            if parameter.grad is not None:
                torch.nn.utils.clip_grad_norm_([parameter], max_norm=1.0)
        optimizer.step()
        scheduler.step()
        validation_error = evaluate(validation)
        history.append(
            {"iteration": iteration, "calibration": float(total.detach()), "validation": validation_error}
        )
        if math.isfinite(validation_error) and validation_error < best_validation:
            best_validation = validation_error
            best = (logits.detach().clone(), corrections.detach().clone(), iteration)
        if progress is not None:
            progress(iteration, iterations)

    _restore(best, logits, corrections)
    fit_cost = {"calls": counted.calls, "samples": counted.samples}
    calibration_error = evaluate(calibration)
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
        "start_shift_factor": float(start_shift_factors[chosen]) if start_shift_factors else 1.0,
        "start_calibration_error": start_calibration,
        "start_validation_error": start_validation,
        "calibration_error": calibration_error,
        "validation_error": best_validation,
        "best_iteration": best[2],
        "iterations": iterations,
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
    **options,
) -> FittedSampler:
    """fit_sampler with ``euler_at_final=None``: the schedule alone is fitted both ways for the first
    ``schedule_only_fraction`` of the iterations, and the full fit goes on from the one with the lower
    validation error for the rest (the probes cost that fraction once more)."""
    probe_iterations = max(1, int(iterations * schedule_only_fraction))
    total = 2 * probe_iterations + iterations - probe_iterations

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


def _restore(best, logits: torch.Tensor, corrections: torch.Tensor) -> None:
    with torch.no_grad():
        logits.copy_(best[0])
        corrections.copy_(best[1])


@torch.no_grad()
def sample_fitted(model, x, sigmas, extra_args=None, callback=None, disable=None, fitted=None):
    """k-diffusion sampler signature for a :class:`FittedSampler` given as ``fitted`` (its ``to_dict``).

    Time convention: ComfyUI sigma (1 = noise, 0 = data); ``model(x, sigma * s_in, **extra_args)`` returns
    the denoised x0. A ``steps`` fit runs its base solver on whatever ``sigmas`` it is given; a
    ``bespoke`` one only on the sigmas it was fitted for (its corrections belong to them).
    ``callback`` receives ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` once per interval.
    """
    sampler = FittedSampler.from_dict(fitted)
    extra_args = {} if extra_args is None else extra_args
    given = sigmas.detach().to(device="cpu", dtype=torch.float64)
    same = given.shape == sampler.sigmas.shape and bool(torch.allclose(given, sampler.sigmas, atol=1e-6))
    if sampler.fit == "bespoke" and not same:
        raise ValueError(
            f"sigmas: this bespoke sampler was fitted for its own {sampler.steps}-step sigmas "
            f"{[round(v, 4) for v in sampler.sigmas.tolist()]}; connect the SIGMAS output of the node that "
            f"fitted it (got {[round(v, 4) for v in given.tolist()]})"
        )
    corrections = sampler.corrections if sampler.fit == "bespoke" else None
    if corrections is not None:
        corrections = corrections.to(device=x.device, dtype=x.dtype)

    def denoise(state, sigma):
        return model(state, sigma, **extra_args)

    def report(i, state, denoised):
        if callback is not None:
            callback({"x": state, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})

    return run_solver(
        denoise,
        x,
        sigmas.to(x.dtype),
        sampler.solver,
        corrections,
        callback=report,
        euler_at_final=sampler.euler_at_final,
    )
