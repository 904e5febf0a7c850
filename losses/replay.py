"""Hard-sample replay: remember recent (sample, sigma, loss) and re-train the hardest ones.

Time convention: sigmas are ComfyUI sigmas (1 = noise, 0 = data); Lumina t = 1 - sigma; diffusers
timestep = 1000 sigma.

Provenance, honestly: the AC-RF write-up names a replay buffer, but no version of the public
AC-RF trainer has one (its nearest mechanisms are a regularisation dataset and the RAFT free-stream
term). This is this package's own design: a bounded FIFO of recent per-sample losses; each step
about ``replay_ratio`` x batch size of the highest-loss entries are trained again *on top of* the
batch (the batch's own samples are never displaced, so every epoch still trains all the data). A
replayed entry leaves the buffer (so one hard sample cannot monopolise training; if it is still hard
after the replay its new loss brings it back). A replay reuses the sample, its sigma and its anchor
index (so the trainer can keep the whole batch stratified over the anchors); the trainer draws fresh
noise. Record comparable losses - the unweighted per-sample loss, not the Min-SNR weighted one -
or "hardest" will mostly mean "the sigma with the largest weight".
"""

from __future__ import annotations

import math
from collections import deque

import torch

_STATE_VERSION = 2  # 2: entries carry their anchor index (1: without, read as -1)
NO_ANCHOR = -1


class HardSampleReplay:
    """Bounded buffer of recent (sample index, sigma, loss, anchor); deterministic given a torch.Generator.

    ``capacity``: entries kept (oldest dropped first). ``replay_ratio`` in [0, 1]: expected replays
    per batch sample, added to the batch (0 = off). ``min_entries``: no replay until this many are kept.
    """

    def __init__(self, capacity: int = 64, replay_ratio: float = 0.0, min_entries: int = 8):
        self._configure(capacity, replay_ratio, min_entries)
        # (sequence, sample index, sigma, loss, anchor index or NO_ANCHOR)
        self._entries: deque[tuple[int, int, float, float, int]] = deque(maxlen=self.capacity)
        self._next_sequence = 0

    def _configure(self, capacity, replay_ratio, min_entries) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"replay capacity must be a positive integer, got {capacity!r}")
        if isinstance(replay_ratio, bool) or not 0.0 <= float(replay_ratio) <= 1.0:
            raise ValueError(f"replay_ratio must be in [0, 1], got {replay_ratio!r}")
        if (
            isinstance(min_entries, bool)
            or not isinstance(min_entries, int)
            or not 1 <= min_entries <= capacity
        ):
            raise ValueError(
                f"replay min_entries must be an integer in [1, capacity={capacity}], got {min_entries!r}"
            )
        self.capacity, self.replay_ratio, self.min_entries = capacity, float(replay_ratio), min_entries

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[tuple[int, float, float]]:
        """(sample index, sigma, loss) of every kept entry, oldest first."""
        return [(index, sigma, loss) for _, index, sigma, loss, _ in self._entries]

    def record(self, sample_indices, sigmas, losses, anchors=None) -> None:
        """Remember one batch: dataset sample indices, their ComfyUI sigmas, per-sample losses [B] and,
        optionally, the anchor index each sigma was drawn at (``NO_ANCHOR`` = -1 for none).

        Losses are detached and stored as Python floats; non-finite losses are skipped (they cannot
        be ranked).
        """
        indices = torch.as_tensor(sample_indices).detach().flatten().tolist()
        sigma_values = torch.as_tensor(sigmas).detach().flatten().tolist()
        loss_values = torch.as_tensor(losses).detach().flatten().tolist()
        anchor_values = (
            [NO_ANCHOR] * len(indices)
            if anchors is None
            else torch.as_tensor(anchors).detach().flatten().tolist()
        )
        if not len(indices) == len(sigma_values) == len(loss_values) == len(anchor_values):
            raise ValueError(
                f"sample_indices, sigmas, losses (and anchors) need one value per sample, got {len(indices)}, "
                f"{len(sigma_values)}, {len(loss_values)}, {len(anchor_values)}"
            )
        for index, sigma, loss, anchor in zip(indices, sigma_values, loss_values, anchor_values, strict=True):
            if not 0.0 <= sigma <= 1.0:
                raise ValueError(f"sigma must lie in [0, 1] (ComfyUI sigma, 1 = noise), got {sigma}")
            if math.isfinite(loss):
                entry = (self._next_sequence, int(index), float(sigma), float(loss), int(anchor))
                self._entries.append(entry)
                self._next_sequence += 1

    def replay_count(self, batch_size: int, generator: torch.Generator) -> int:
        """How many replays to add to a batch of ``batch_size``: floor(B r) plus one with probability frac(B r).

        The expectation is exactly B * replay_ratio, also for batch 1. One uniform draw is made
        whenever replay_ratio > 0, whatever the buffer holds, so the generator's sequence does not
        depend on the losses.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if self.replay_ratio == 0.0:
            return 0
        draw = float(torch.rand((), generator=generator, device=generator.device))
        expected = batch_size * self.replay_ratio
        count = math.floor(expected) + (1 if draw < expected - math.floor(expected) else 0)
        if len(self._entries) < self.min_entries:
            return 0
        return min(count, batch_size, len(self._entries))

    def pop_hardest(self, count: int) -> list[tuple[int, float, int]]:
        """Remove and return the ``count`` highest-loss entries as (sample index, sigma, anchor), hardest first.

        Ties go to the more recent entry.
        """
        if count <= 0:
            return []
        ranked = sorted(self._entries, key=lambda entry: (entry[3], entry[0]), reverse=True)
        chosen = ranked[:count]
        chosen_sequences = {entry[0] for entry in chosen}
        self._entries = deque(
            (e for e in self._entries if e[0] not in chosen_sequences), maxlen=self.capacity
        )
        return [(index, sigma, anchor) for _, index, sigma, _, anchor in chosen]

    def plan_replays(self, batch_size: int, generator: torch.Generator) -> list[tuple[int, float, int]]:
        """The (sample index, sigma, anchor) entries to train in addition to a batch of ``batch_size``."""
        return self.pop_hardest(self.replay_count(batch_size, generator))

    def state_dict(self) -> dict:
        """Everything needed for exact resume, as plain Python values (torch.save / JSON friendly).

        The generator's state is the caller's to save (``generator.get_state()``).
        """
        return {
            "version": _STATE_VERSION,
            "capacity": self.capacity,
            "replay_ratio": self.replay_ratio,
            "min_entries": self.min_entries,
            "next_sequence": self._next_sequence,
            "entries": [list(entry) for entry in self._entries],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` snapshot, configuration included (like an optimizer's)."""
        expected = {"version", "capacity", "replay_ratio", "min_entries", "next_sequence", "entries"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"replay state must be a dict with keys {sorted(expected)}, got {got}")
        if state["version"] not in (1, _STATE_VERSION):
            raise ValueError(
                f"replay state version {state['version']!r} is not supported (expected {_STATE_VERSION})"
            )
        self._configure(state["capacity"], state["replay_ratio"], state["min_entries"])
        if state["version"] == 1:  # entries without their anchor
            state = {**state, "entries": [[*entry, NO_ANCHOR] for entry in state["entries"]]}
        entries = [
            (int(s), int(i), float(sig), float(loss), int(a)) for s, i, sig, loss, a in state["entries"]
        ]
        if len(entries) > self.capacity:
            raise ValueError(
                f"replay state holds {len(entries)} entries, more than its capacity {self.capacity}"
            )
        self._entries = deque(entries, maxlen=self.capacity)
        self._next_sequence = int(state["next_sequence"])
