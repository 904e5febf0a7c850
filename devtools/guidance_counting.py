"""Counting transformer passes for the guidance tests: rows per forward, grouped into model calls, and the
sampler step each call belongs to, read back from the whole run.

A forward is one transformer evaluation (``x.shape[0]`` batch rows; ``cond_or_uncond`` says which branch
each row is: 0 = positive, 1 = negative). A model call is what the sampler asked for at one sigma: one
forward, or two when the branches could not be batched (different token lengths). Time convention:
ComfyUI sigma (1 = noise).
"""

from __future__ import annotations


class RowCounter:
    """Records ``(sigma, cond_or_uncond, rows)`` per transformer forward and the steps the sampler reports.

    Use it as a ``WrappersMP.DIFFUSION_MODEL`` wrapper (call it), as a global module forward hook
    (:meth:`forward_hook`, registered ``with_kwargs=True`` where the model is built inside a prompt), and
    pass :meth:`report` as the sampling callback to record the sampler's step reports.
    """

    def __init__(self):
        self.forwards = []
        self.reports = []  # (forwards recorded before the report, reported step)

    def record(self, x, timesteps, transformer_options) -> None:
        branches = tuple((transformer_options or {}).get("cond_or_uncond", ()))
        self.forwards.append((float(timesteps.reshape(-1)[0]), branches, x.shape[0]))

    def __call__(self, executor, x, timesteps, *args, **kwargs):
        self.record(x, timesteps, kwargs.get("transformer_options"))
        return executor(x, timesteps, *args, **kwargs)

    def forward_hook(self, module, args, kwargs, output):
        x, timesteps = (list(args) + [kwargs.get("x"), kwargs.get("timesteps")])[:2]
        self.record(x, timesteps, kwargs.get("transformer_options"))

    def report(self, step, *rest):
        self.reports.append((len(self.forwards), int(step)))

    @property
    def rows(self):
        return sum(rows for _, _, rows in self.forwards)

    def calls(self):
        """``[sigma, branches, rows, last forward index]`` per model call: a forward that completes the other
        branch of the previous one at the same sigma (no report between) belongs to the same call."""
        reported_after = {count - 1 for count, _ in self.reports}
        calls = []
        for index, (sigma, branches, rows) in enumerate(self.forwards):
            previous = calls[-1] if calls else None
            if (
                previous is not None
                and previous[3] not in reported_after
                and previous[0] == sigma
                and set(previous[1]) | set(branches) == {0, 1}
                and not set(previous[1]) & set(branches)
            ):
                calls[-1] = [sigma, (0, 1), previous[2] + rows, index]
            else:
                calls.append([sigma, branches, rows, index])
        return calls

    def rows_by_sigma(self):
        """(sigma, rows) per model call."""
        return [(sigma, rows) for sigma, _, rows, _ in self.calls()]

    def steps_of_calls(self):
        """The sampler step of each model call, read back from the whole run: every ComfyUI sampler reports
        step i right after step i's first model call, so the call just before the report of step i starts
        step i, and the calls after it (until the next step's first) are step i's later stages."""
        calls = self.calls()
        starts = {}
        for count, step in self.reports:
            (call,) = [c for c, entry in enumerate(calls) if entry[3] == count - 1]
            starts[call] = step
        if not starts:
            raise AssertionError("the sampler reported no step")
        owners, current = [], max(min(starts.values()) - 1, 0)
        for c in range(len(calls)):
            current = starts.get(c, current)
            owners.append(current)
        return owners
