"""Few-step samplers fitted to one denoiser: the step times, and optionally a bespoke solver (no comfy import).

Time convention: **ComfyUI sigma**, 1 = noise, 0 = data, ``x_sigma = (1 - sigma) x0 + sigma noise``
(Lumina t = 1 - sigma; diffusers timestep = 1000 sigma). ``denoise(x, sigma)`` returns the x0 prediction
of a batch, ``sigma`` a [B] tensor; the flow ODE is ``dx/dsigma = (x - x0) / sigma``.

Every solver here is written in denoised form: an interval [s, s'] maps the state x and the model's
predictions D to ``x' = A x + B D + C (D - D_prev) + E (D_prev - D_prev2)``, with A, B, C, E fixed by the
base solver (Align-Your-Steps style fits change only the sigmas). The ``bespoke`` fit adds per-step
corrections (a, b, c, d) to those coefficients, in the spirit of Bespoke Solvers (Shaul et al., ICLR 2024);
the fitting itself is samplers/fitting.py.

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
from dataclasses import dataclass, field

import torch

from .flow import velocity_from_denoised
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
