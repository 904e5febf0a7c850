"""Hard-sample replay buffer: which entries replay, how many, and exact resume through state_dict."""

import copy

import pytest
import torch

from lumina_turbo.losses import HardSampleReplay


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_replays_the_hardest_and_removes_them():
    buffer = HardSampleReplay(capacity=10, replay_ratio=0.5, min_entries=1)
    buffer.record([0, 1, 2, 3], torch.tensor([0.9, 0.5, 0.3, 0.1]), torch.tensor([0.2, 0.9, 0.5, 0.9]))
    # ties (loss 0.9) go to the more recent entry
    assert buffer.pop_hardest(3) == [
        (3, pytest.approx(0.1), -1),
        (1, pytest.approx(0.5), -1),
        (2, pytest.approx(0.3), -1),
    ]
    assert [entry[0] for entry in buffer.entries()] == [0]


def test_replays_keep_their_anchor_index():
    buffer = HardSampleReplay(capacity=10, replay_ratio=0.5, min_entries=1)
    buffer.record([4, 5, 6], [0.96, 0.5, 0.7], [1.0, 3.0, 2.0], anchors=[1, 5, -1])
    assert buffer.pop_hardest(3) == [(5, 0.5, 5), (6, pytest.approx(0.7), -1), (4, pytest.approx(0.96), 1)]
    with pytest.raises(ValueError, match="one value per sample"):
        buffer.record([0, 1], [0.5, 0.5], [1.0, 2.0], anchors=[0])


def test_version_1_state_loads_without_anchors():
    buffer = HardSampleReplay(capacity=4, replay_ratio=0.5, min_entries=1)
    state = {
        "version": 1,
        "capacity": 4,
        "replay_ratio": 0.5,
        "min_entries": 1,
        "next_sequence": 2,
        "entries": [[0, 7, 0.5, 1.0], [1, 8, 0.3, 2.0]],
    }
    buffer.load_state_dict(state)
    assert buffer.pop_hardest(2) == [(8, 0.3, -1), (7, 0.5, -1)]
    assert buffer.state_dict()["version"] == 2


def test_capacity_keeps_the_most_recent():
    buffer = HardSampleReplay(capacity=3, min_entries=1)
    buffer.record(range(5), [0.5] * 5, [5.0, 4.0, 3.0, 2.0, 1.0])
    assert [entry[0] for entry in buffer.entries()] == [2, 3, 4]


def test_non_finite_losses_are_skipped_and_bad_records_raise():
    buffer = HardSampleReplay(min_entries=1)
    buffer.record([0, 1], [0.5, 0.5], [float("nan"), 1.0])
    assert [entry[0] for entry in buffer.entries()] == [1]
    with pytest.raises(ValueError, match="one value per sample"):
        buffer.record([0, 1], [0.5], [1.0, 2.0])
    with pytest.raises(ValueError, match="sigma must lie in"):
        buffer.record([0], [1.5], [1.0])


def test_replay_count_expectation_and_warmup():
    buffer = HardSampleReplay(capacity=100, replay_ratio=0.3, min_entries=5)
    generator = _gen(1)
    buffer.record(range(4), [0.5] * 4, [1.0] * 4)
    assert buffer.replay_count(4, generator) == 0  # fewer than min_entries
    buffer.record(range(4, 50), [0.5] * 46, [1.0] * 46)
    counts = torch.tensor([buffer.replay_count(2, generator) for _ in range(4000)], dtype=torch.float64)
    assert set(counts.tolist()) <= {0.0, 1.0}
    assert abs(float(counts.mean()) - 0.6) < 0.03  # 2 * 0.3
    assert HardSampleReplay(replay_ratio=0.0).replay_count(8, generator) == 0


def test_state_round_trip_gives_identical_future():
    buffer = HardSampleReplay(capacity=16, replay_ratio=0.4, min_entries=4)
    generator = _gen(2)
    data = torch.Generator().manual_seed(3)
    for step in range(6):
        buffer.record(
            torch.arange(step * 3, step * 3 + 3), torch.rand(3, generator=data), torch.rand(3, generator=data)
        )
        buffer.plan_replays(3, generator)
    saved_state = copy.deepcopy(buffer.state_dict())
    saved_generator = generator.get_state()

    def run(buf, gen):
        plans = []
        feed = torch.Generator().manual_seed(4)
        for step in range(8):
            plans.append(buf.plan_replays(3, gen))
            buf.record(
                torch.arange(100 + step * 3, 103 + step * 3),
                torch.rand(3, generator=feed),
                torch.rand(3, generator=feed),
            )
        return plans, buf.state_dict()

    original = run(buffer, generator)
    restored_buffer = HardSampleReplay()  # different config: the state carries its own
    restored_buffer.load_state_dict(saved_state)
    restored_generator = torch.Generator()
    restored_generator.set_state(saved_generator)
    resumed = run(restored_buffer, restored_generator)
    assert resumed == original
    assert any(original[0])  # something was actually replayed


def test_bad_configuration_and_state():
    with pytest.raises(ValueError, match="replay_ratio"):
        HardSampleReplay(replay_ratio=1.5)
    with pytest.raises(ValueError, match="capacity"):
        HardSampleReplay(capacity=0)
    with pytest.raises(ValueError, match="min_entries"):
        HardSampleReplay(capacity=4, min_entries=5)
    buffer = HardSampleReplay()
    with pytest.raises(ValueError, match="keys"):
        buffer.load_state_dict({"entries": []})
    state = buffer.state_dict()
    state["version"] = 99
    with pytest.raises(ValueError, match="version"):
        buffer.load_state_dict(state)
