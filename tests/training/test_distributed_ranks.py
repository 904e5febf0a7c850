"""training/distributed.py without processes: the launcher's environment read, shares that cover every
sample once, and a world of one where every collective is the identity."""

import pytest
import torch

from lumina_turbo.training import distributed
from lumina_turbo.training.distributed import SINGLE_PROCESS, DistributedSetupError, Ranks, launched_ranks

LAUNCHED = {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shares_split_every_micro_batch_without_duplicates_or_losses(world):
    for count in range(0, 20):
        shares = [list(Ranks(rank, world).share(count)) for rank in range(world)]
        assert sum(shares, []) == list(range(count))  # contiguous, in order, each sample once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert all(
            Ranks(0, world).share(count, rank) == Ranks(rank, world).share(count) for rank in range(world)
        )


def test_the_launchers_environment_is_read_or_refused():
    assert launched_ranks({}) is SINGLE_PROCESS
    ranks = launched_ranks({**LAUNCHED, distributed.TIMEOUT_VARIABLE: "12"})
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.timeout_s) == (1, 2, 1, 12.0)
    assert not ranks.is_main and not ranks.grouped  # no process group before start()
    with pytest.raises(DistributedSetupError, match="lacks MASTER_ADDR"):
        launched_ranks({k: v for k, v in LAUNCHED.items() if k != "MASTER_ADDR"})
    with pytest.raises(DistributedSetupError, match="must be integers"):
        launched_ranks({**LAUNCHED, "RANK": "one"})
    with pytest.raises(DistributedSetupError, match="0 <= RANK < WORLD_SIZE"):
        launched_ranks({**LAUNCHED, "RANK": "2"})
    with pytest.raises(DistributedSetupError, match="positive timeout"):
        launched_ranks({**LAUNCHED, distributed.TIMEOUT_VARIABLE: "0"})
    with pytest.raises(DistributedSetupError, match="accelerate launch --multi_gpu"):
        launched_ranks({"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})


def test_one_process_collectives_are_the_identity():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    params[0].grad = torch.full((3,), 2.0)
    SINGLE_PROCESS.sum_gradients(params)
    assert torch.equal(params[0].grad, torch.full((3,), 2.0)) and params[1].grad is None
    value = torch.arange(4.0)
    assert SINGLE_PROCESS.all_gather_tensor(value, "x")[0] is value
    assert SINGLE_PROCESS.broadcast_object({"a": 1}, "x") == {"a": 1}
    SINGLE_PROCESS.check_same("configs", {"a": 1})
    SINGLE_PROCESS.barrier("x")
    assert list(SINGLE_PROCESS.share(5)) == [0, 1, 2, 3, 4]


def test_epochs_count_global_batches():
    """num_train_epochs means the same with N processes x batch b as with 1 process x batch N*b."""
    from lumina_turbo.training.config import TrainConfig
    from lumina_turbo.training.engine import total_steps

    class TenItems:
        def batches_per_epoch(self, batch_size):
            return -(-10 // batch_size)

    per_process = TrainConfig(num_train_epochs=3, batch_size=2, gradient_accumulation_steps=1)
    assert (
        total_steps(per_process, TenItems(), 2)
        == total_steps(per_process.replace(batch_size=4), TenItems())
        == 9
    )
    assert total_steps(per_process, TenItems()) == 15
