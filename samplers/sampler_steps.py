"""Which sampler step each model call of one sampling run belongs to (no comfy import).

Time convention: ComfyUI sigma (1 = noise, 0 = data; Lumina t = 1 - sigma; diffusers timestep = 1000 * sigma).

A sigma alone cannot place every call: heun's corrector of step i is evaluated at ``sigmas[i+1]``, exactly
where step i+1 starts, and receives exactly the state Euler's step i+1 would (``x + d * dt``). What settles it
is the sampler's own progress report: every ComfyUI sampler (k-diffusion's, UniPC, the pack's flow midpoint)
calls its callback with ``i`` right after the **first** model call of step i. So between the reports of steps
L and L+1 come step L's later stages (corrector, midpoint, ...) and then step L+1's first call, which always
sits on its start point ``sigmas[L+1]``. :class:`SamplerSteps` uses that order:

1. before any report: the step the sigma falls in (:func:`samplers.guidance.step_position`); samplers that
   never report keep this sigma-only answer for the whole run;
2. after the report of step L, a call at or inside step L, or strictly inside the next step, is a stage of L;
3. a call on a later start point is the next step's first call, unless fewer calls have come since the report
   than came between the last two reports (the sampler's own pattern, learned as it runs) and the point has
   not been visited since the report: then it is a stage of L that lands on the end point (heun's corrector,
   heunpp2's two look-aheads, an ancestral sub-step nudged up to ``sigmas[L+1]``).

Until two consecutive reports have shown the pattern, rule 3 has nothing to compare with; samplers known to
evaluate the end point may pass their pattern in (``calls_between_reports``).
"""

from __future__ import annotations

import torch

from .guidance import _as_float, step_position


class SamplerSteps:
    """Attributes the model calls of one sampling run over ``sample_sigmas`` (descending ComfyUI sigmas,
    1 = noise) to sampler steps; see the module docstring for the rules.

    Feed it in call order: :meth:`step_of_call` once per model call (returns the 0-based step), and
    :meth:`step_reported` whenever the sampler's callback reports step ``i``.
    ``calls_between_reports``: the sampler's known number of model calls between two reports (heun 2), or
    None to learn it from the run.
    """

    def __init__(self, sample_sigmas, calls_between_reports: int | None = None):
        self.sample_sigmas = torch.as_tensor(sample_sigmas).detach().to("cpu")  # read on every call
        self.reported: int | None = None
        self.calls_between_reports = calls_between_reports
        self._points_since_report: list[int | None] = []  # start point of each call since the report, or None

    def step_reported(self, step: int) -> None:
        """The sampler's callback reported step ``step`` (0-based), i.e. that step's first call is done."""
        step = int(step)
        if self.reported is not None and step == self.reported + 1:
            self.calls_between_reports = len(self._points_since_report)
        self.reported = step
        self._points_since_report = []

    def step_of_call(self, sigma) -> int:
        """The step a model call at ComfyUI ``sigma`` (float or per-row tensor, 1 = noise) belongs to."""
        step, at_start = step_position(sigma, self.sample_sigmas)
        exact = at_start and _as_float(sigma) == float(self.sample_sigmas[step])
        owner = self._owner(step, at_start, exact)
        self._points_since_report.append(step if at_start else None)
        return owner

    def _owner(self, step: int, at_start: bool, exact: bool) -> int:
        current = self.reported
        if current is None:  # rule 1
            return step
        if step <= current or (not at_start and step == current + 1):  # rule 2
            return current
        if not at_start:  # inside a step further on: the sampler skipped reports, the sigma decides
            return step
        pattern = self.calls_between_reports
        if pattern is None:  # rule 3 before the pattern is known: a step starts exactly on its point
            return step if exact else current
        calls = len(self._points_since_report) + 1
        if calls < pattern and step not in self._points_since_report:  # rule 3
            return current
        return step
