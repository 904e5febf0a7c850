"""Running the headless trainer as several processes, for the tests and the benchmark (never imported by the pack).

``example_toml`` is configs/zimage_turbo_lora.toml pointed at the tiny Z-Image model and a small data set;
the launch helpers start ``python -m lumina_turbo.train`` alone, under torchrun, under ``accelerate
launch``, or as ranks whose launcher environment is set by hand, always importing this checkout.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from .harness import REPO

EXAMPLE_TOML = REPO / "configs" / "zimage_turbo_lora.toml"
TINY_EXAMPLE = {
    "model.dit": '"tiny-random-zimage.safetensors"',
    "model.text_encoder": '"tiny-random-qwen3.safetensors"',
    "model.vae": '"tiny-random-flux-vae.safetensors"',
    "model.output_dir": '"out"',
    "model.save_dtype": '"fp32"',
    "lora.network_dim": "4",
    "lora.network_alpha": "4",
    "training.learning_rate": "1e-3",
    "training.lr_warmup_steps": "1",
    "training.max_train_steps": "4",
    "training.save_every_n_steps": "2",
    "training.checkpoint_dir": '"ckpt"',
    "advanced.gradient_checkpointing": "false",
    "dataset.folder": '"data"',
    "dataset.resolution": "64",
    "dataset.cache_dir": '"cache"',
}


def example_toml(**changes: str) -> str:
    """The example TOML on the tiny models; ``changes`` ("section__key": TOML value) replace its values."""
    values = {**TINY_EXAMPLE, **{key.replace("__", "."): value for key, value in changes.items()}}
    text = EXAMPLE_TOML.read_text()
    for dotted, value in values.items():
        section, key = dotted.split(".")
        header = f"[{section}]\n"
        start = text.index(header) + len(header)
        end = text.find("\n[", start)
        end = len(text) if end < 0 else end
        body = text[start:end]
        line = re.compile(rf"^{key}\s*=.*$", re.MULTILINE)
        body = (
            line.sub(f"{key} = {value}", body, count=1) if line.search(body) else f"{key} = {value}\n{body}"
        )
        text = text[:start] + body + text[end:]
    return text


def cli_env(threads: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a trainer process: this checkout importable as lumina_turbo, ``threads`` threads."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        PYTHONPATH=str(REPO / ".comfyui" / "custom_nodes"),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        **extra,
    )
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def single(toml: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lumina_turbo.train", "--config", str(toml), *args]


def torchrun(processes: int, toml: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "lumina_turbo.train",
        "--config",
        str(toml),
        *args,
    ]


def accelerate_launch(processes: int, toml: Path, *args: str) -> list[str]:
    """``accelerate launch`` of the trainer; ``--multi_gpu`` is what makes accelerate start N processes
    itself (through torch's elastic launcher), CPU processes included - ``--cpu`` would need MPI."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        f"--num_processes={processes}",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
        "-m",
        "lumina_turbo.train",
        "--config",
        str(toml),
        *args,
    ]


def run(command: list[str], *, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, env=cli_env(**env), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def start_ranks(
    configs: list[Path], *, port: int | None = None, program: list[str] | None = None, **env: str
) -> list[subprocess.Popen]:
    """One process per TOML, rank i of len(configs), with the launcher's variables set by hand (what a
    launcher on each machine does); stdout/stderr are pipes. ``program``: the command that takes
    ``--config file.toml`` (``python -m lumina_turbo.train`` when None)."""
    port = port or free_port()
    processes = []
    for rank, toml in enumerate(configs):
        variables = cli_env(
            RANK=str(rank),
            WORLD_SIZE=str(len(configs)),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(len(configs)),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            **env,
        )
        processes.append(
            subprocess.Popen(
                [*program, "--config", str(toml)] if program else single(toml),
                env=variables,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
        )
    return processes


def lora_difference(a: dict, b: dict) -> float:
    """max |a - b| / max |b| over all the LoRA's tensors (the keys must match).

    Element-wise ratios would be meaningless: AdamW's first steps normalise each gradient element, so
    elements whose gradient is ~0 move by +-lr on float rounding of the summation order alone."""
    if a.keys() != b.keys():
        raise AssertionError(f"different LoRA keys: {sorted(a.keys() ^ b.keys())[:4]}")
    largest = max(float(t.abs().max()) for t in b.values())
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a) / largest
