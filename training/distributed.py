"""Several training processes (``torchrun`` / ``accelerate launch``) as one run: torch.distributed glue.

The launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) defines the
process group; without it the run is one process and every collective below is a no-op, so one
process is world size 1 of the same code. Each rank uses the device ComfyUI's model management
gives it after ``torch.cuda.set_device(LOCAL_RANK)``; the backend is NCCL on CUDA, gloo otherwise
(``LUMINA_TURBO_DIST_BACKEND`` overrides it). Every collective waits at most
``LUMINA_TURBO_DIST_TIMEOUT`` seconds: a rank that died or hangs stops the others with ProcessLost.

Only the LoRA gradients are communicated (summed once per optimizer step: the ranks' losses are
already divided by the global sample count, so the sum is the gradient of the global mean, what DDP's
average gives for equal shares), plus a few small Python objects (per-sample losses, RNG states).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BACKEND_VARIABLE = "LUMINA_TURBO_DIST_BACKEND"
TIMEOUT_VARIABLE = "LUMINA_TURBO_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 900.0  # generous: the ranks also wait for each other's share of the data cache


class DistributedSetupError(RuntimeError):
    """The launcher's environment or the ranks' inputs do not make one run; the message says what to fix."""


class ProcessLost(RuntimeError):
    """Another process of the run stopped or did not answer within the timeout."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run; the default is a run of one process (no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    backend: str = ""  # "" = no process group
    device: str = "cpu"  # where this backend's collectives take tensors (NCCL: this rank's GPU)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, the LoRA and the logs."""
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        return bool(self.backend)

    def share(self, count: int, rank: int | None = None) -> range:
        """This (or ``rank``'s) contiguous part of ``count`` planned samples (parts differ by at most one)."""
        rank = self.rank if rank is None else rank
        return range(rank * count // self.world_size, (rank + 1) * count // self.world_size)

    # ----- collectives -----------------------------------------------------------------------------
    def _collective(self, what: str, call: Callable):
        try:
            return call()
        except Exception as exc:  # gloo/NCCL report a lost peer as several error types
            raise ProcessLost(
                f"process {self.rank} of {self.world_size}: another process stopped or did not answer within "
                f"{self.timeout_s:g} s while {what} ({type(exc).__name__}: {_first_line(exc)})"
            ) from exc

    def barrier(self, what: str) -> None:
        if self.grouped:
            import torch.distributed as dist

            if self.backend == "gloo":  # names the rank that did not arrive
                self._collective(what, lambda: dist.monitored_barrier(timeout=self._timeout()))
            else:
                self._collective(what, dist.barrier)

    def all_gather_object(self, value, what: str) -> list:
        """[value of rank 0, value of rank 1, ...] on every rank."""
        if not self.grouped:
            return [value]
        import torch.distributed as dist

        gathered = [None] * self.world_size
        self._collective(what, lambda: dist.all_gather_object(gathered, value))
        return gathered

    def all_gather_tensor(self, value: torch.Tensor, what: str, sizes: list[int] | None = None) -> list:
        """[rank 0's 1-D ``value``, rank 1's, ...] on the CPU, in one collective; ``sizes``: each rank's
        element count when they differ (all equal to this one's when None)."""
        if not self.grouped:
            return [value]
        import torch.distributed as dist

        sizes = sizes or [value.numel()] * self.world_size
        padded = torch.zeros(max(sizes), dtype=value.dtype, device=self.device)
        padded[: value.numel()] = value.reshape(-1)
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._collective(what, lambda: dist.all_gather(gathered, padded))
        return [tensor[:size].cpu() for tensor, size in zip(gathered, sizes, strict=True)]

    def broadcast_object(self, value, what: str):
        """Rank 0's ``value`` on every rank."""
        if not self.grouped:
            return value
        import torch.distributed as dist

        box = [value]
        self._collective(what, lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each parameter's gradient by the sum over the ranks (one flat all-reduce).

        A rank whose share of a micro-batch was empty has no gradient yet: it contributes zeros. A
        parameter no rank computed a gradient for keeps ``grad = None``, as in one process."""
        if not self.grouped:
            return
        import torch.distributed as dist

        device = params[0].device
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
            + [present]
        )
        self._collective("summing the LoRA gradients", lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
        offset = 0
        for param in params:
            count = param.numel()
            param.grad = flat[offset : offset + count].view_as(param).to(param.dtype)
            offset += count
        for param, any_rank in zip(params, flat[offset:].tolist(), strict=True):
            if any_rank == 0:
                param.grad = None

    def check_same(self, what: str, value) -> None:
        """Refuse a run whose ranks disagree on ``value`` (a JSON-able description, e.g. the config)."""
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
        digests = self.all_gather_object(digest, f"comparing the {what}")
        if len(set(digests)) > 1:
            groups: dict[str, list[int]] = {}
            for rank, d in enumerate(digests):
                groups.setdefault(d, []).append(rank)
            listed = "; ".join(f"ranks {ranks}" for ranks in groups.values())
            raise DistributedSetupError(
                f"the processes of this run were given different {what} ({listed} agree among themselves): "
                "launch every process with the same TOML file, dataset and models"
            )

    def _timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)

    def close(self) -> None:
        if self.grouped:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE_PROCESS = Ranks()


def launched_ranks(env: Mapping[str, str] = os.environ) -> Ranks:
    """The Ranks the launcher's environment describes (no backend chosen yet), SINGLE_PROCESS without one."""
    if "WORLD_SIZE" not in env and "RANK" not in env:
        if env.get("ACCELERATE_MIXED_PRECISION") and env.get("MASTER_ADDR"):
            # accelerate's simple launcher sets MASTER_ADDR only for several processes, yet starts one
            raise DistributedSetupError(
                "accelerate launch asked for several processes but started one without a RANK (on CPU it "
                "needs MPI for that): use `accelerate launch --multi_gpu --num_processes N ...` (it starts N "
                "processes, CPU ones too) or `torchrun --nproc_per_node N ...`"
            )
        return SINGLE_PROCESS
    missing = [name for name in LAUNCHER_VARIABLES if not env.get(name)]
    if missing:
        raise DistributedSetupError(
            f"the launcher's environment lacks {', '.join(missing)}: start several processes with "
            "`torchrun --nproc_per_node N -m lumina_turbo.train ...` or `accelerate launch --multi_gpu "
            "--num_processes N -m lumina_turbo.train ...`, or unset RANK/WORLD_SIZE for one process"
        )
    try:
        rank, world, local = (int(env[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        timeout = float(env.get(TIMEOUT_VARIABLE) or DEFAULT_TIMEOUT_S)
    except ValueError as exc:
        raise DistributedSetupError(
            f"RANK, WORLD_SIZE, LOCAL_RANK must be integers and {TIMEOUT_VARIABLE} a number of seconds ({exc})"
        ) from None
    if not (world >= 1 and 0 <= rank < world and local >= 0 and timeout > 0):
        raise DistributedSetupError(
            f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}, {TIMEOUT_VARIABLE}={timeout:g}: expected "
            "0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0 and a positive timeout"
        )
    return Ranks(rank, world, local, timeout)


def start(env: Mapping[str, str] = os.environ) -> Ranks:
    """Join the launcher's process group (after ComfyUI's bootstrap); SINGLE_PROCESS when not launched.

    Pins this rank's CUDA device to LOCAL_RANK first, so ComfyUI's model management (which loads on
    ``torch.cuda.current_device()``) puts the models there."""
    ranks = launched_ranks(env)
    if ranks is SINGLE_PROCESS:
        return ranks
    import comfy.model_management as mm
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedSetupError("this torch build has no torch.distributed: install a torch that has it")
    if mm.get_torch_device().type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(
                f"LOCAL_RANK={ranks.local_rank} but this machine shows {torch.cuda.device_count()} CUDA "
                "devices: launch at most that many processes per machine"
            )
        torch.cuda.set_device(ranks.local_rank)
    device = mm.get_torch_device()
    backend = env.get(BACKEND_VARIABLE) or ("nccl" if device.type == "cuda" else "gloo")
    usable = {"gloo": ("cpu", "cuda"), "nccl": ("cuda",), "xccl": ("xpu",), "mpi": ("cpu", "cuda")}
    if backend not in usable or not dist.is_backend_available(backend) or device.type not in usable[backend]:
        raise DistributedSetupError(
            f"{BACKEND_VARIABLE}={backend}: that torch.distributed backend is not available for this "
            f"process's device ({device}); use gloo for CPU processes and nccl for CUDA ones (the default)"
        )
    options = {"backend": backend, "timeout": datetime.timedelta(seconds=ranks.timeout_s)}
    if device.type == "cuda":
        options["device_id"] = device
    for name in MODULES_BINDING_THE_DEFAULT_GROUP:
        importlib.import_module(name)
    try:
        dist.init_process_group(**options)
    except Exception as exc:  # rendezvous failures come as several error types
        raise DistributedSetupError(
            f"could not join the process group at {env['MASTER_ADDR']}:{env['MASTER_PORT']} as rank "
            f"{ranks.rank} of {ranks.world_size} ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    collectives_device = str(device) if backend == "nccl" else "cpu"
    return Ranks(ranks.rank, ranks.world_size, ranks.local_rank, ranks.timeout_s, backend, collectives_device)


# torch modules whose functions take ``group=dist.group.WORLD`` as an argument default. Imported after
# init_process_group (ComfyUI's model code pulls them in through torch._dynamo) they hold the group past
# destroy_process_group, so its backend threads (gloo's) live into the interpreter's exit, which then can
# abort a finished run ("terminate called without an active exception"). Imported before, the default is None.
MODULES_BINDING_THE_DEFAULT_GROUP = (
    "torch.distributed.nn",
    "torch.distributed.fsdp",
    "torch.distributed.optim",
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""
