"""One process of bench_distributed: the headless trainer's command line, its optimizer steps timed.

Run as ``python -m benchmarks.distributed_worker --config x.toml`` (alone or under torchrun); rank 0
writes the step times (wall clock and CPU), and the time it spent in each collective (waiting for the other rank
included), to $LUMINA_TURBO_BENCH_TIMINGS.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def main() -> int:
    torch.set_num_threads(1)
    stamps: list[float] = []
    cpu: list[float] = []  # this process's CPU seconds: the work, whatever the machine's load

    def stamp(*_):
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())

    register_optimizer_step_post_hook(stamp)
    from lumina_turbo.training.cli import main as train
    from lumina_turbo.training.distributed import Ranks

    collectives: list[tuple[float, float]] = []  # (end time, seconds inside)
    plain = Ranks._collective

    def timed(self, what, call):
        start = time.perf_counter()
        try:
            return plain(self, what, call)
        finally:
            collectives.append((time.perf_counter(), time.perf_counter() - start))

    Ranks._collective = timed
    status = train(sys.argv[1:])
    if status == 0 and int(os.environ.get("RANK", "0")) == 0:
        timings = {"step_times": stamps, "cpu_times": cpu, "collectives": collectives}
        Path(os.environ["LUMINA_TURBO_BENCH_TIMINGS"]).write_text(json.dumps(timings))
    return status


if __name__ == "__main__":
    sys.exit(main())
