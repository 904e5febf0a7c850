"""``python -m lumina_turbo.train --config file.toml``: the documented command, the same engine as the node,
resume, and one-line errors for bad configs."""

import os
import subprocess
import sys

import torch

from lumina_turbo.devtools.example_dataset import write_concept_dataset
from lumina_turbo.devtools.harness import REPO
from lumina_turbo.devtools.training_support import one_thread, tiny_family  # noqa: F401 (autouse: one torch thread)
from lumina_turbo.training import config as cfg
from lumina_turbo.training import engine
from lumina_turbo.training.dataset import build_from_folder

TOML = """
[model]
transformer = "tiny-random-lumina2.safetensors"
text_encoder = "tiny-random-gemma2.safetensors"
vae = "tiny-random-flux-vae.safetensors"
output_dir = "out"
output_name = "cli_lora"
save_dtype = "fp32"

[acrf]
turbo_steps = 8
replay_ratio = 0.5
replay_min_entries = 2

[lora]
network_dim = 4
network_alpha = 2

[training]
learning_rate = 1e-3
max_train_steps = 3
lambda_l1 = 0.1
mixed_precision = "fp32"
checkpoint_dir = "ckpt"
seed = 3

[advanced]
gradient_checkpointing = false

[dataset]
folder = "data"
batch_size = 2
resolution = 64
cache_dir = "cache"
"""


def command(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO / ".comfyui" / "custom_nodes")}
    return subprocess.run(
        [sys.executable, "-m", "lumina_turbo.train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_documented_command_checks_a_config(tmp_path):
    write_concept_dataset(tmp_path / "data", count=2)
    (tmp_path / "t.toml").write_text(TOML)
    done = command("--config", str(tmp_path / "t.toml"), "--check")
    assert done.returncode == 0, done.stderr
    assert "2 captioned images" in done.stdout
    (tmp_path / "bad.toml").write_text(TOML.replace("learning_rate", "learning_rat"))
    done = command("--config", str(tmp_path / "bad.toml"), "--check")
    assert done.returncode == 2
    assert "[training] learning_rat" in done.stderr and "Traceback" not in done.stderr


def test_cli_trains_like_the_engine_and_resumes(tiny_models, tmp_path, capsys):
    from lumina_turbo.training.cli import main

    write_concept_dataset(tmp_path / "data", count=3)
    (tmp_path / "t.toml").write_text(TOML)
    assert main(["--config", str(tmp_path / "t.toml")]) == 0
    assert "resumed at 0" in capsys.readouterr().out
    import safetensors.torch

    written = safetensors.torch.load_file(tmp_path / "out" / "cli_lora.safetensors")

    # the same config through the engine directly (what LTLoraTrainer runs) gives the same tensors
    config = cfg.load_toml(tmp_path / "t.toml")
    model, clip, vae = tiny_family("lumina2")
    data = build_from_folder(
        tmp_path / "data", vae=vae, clip=clip, cache_root=tmp_path / "cache", resolution=64
    )
    assert data.stats["latents_encoded"] == 0 and data.stats["texts_encoded"] == 0  # the CLI's cache
    direct = engine.LoraTrainer(config, model, data).run()
    assert written.keys() == direct.lora.keys()
    assert all(torch.equal(written[k], direct.lora[k]) for k in written)

    # running the command again finds the finished checkpoint: nothing to train, same file
    assert main(["--config", str(tmp_path / "t.toml")]) == 0
    assert "resumed at 3" in capsys.readouterr().out
    again = safetensors.torch.load_file(tmp_path / "out" / "cli_lora.safetensors")
    assert all(torch.equal(written[k], again[k]) for k in written)


def test_late_ctrl_c_does_not_turn_a_saved_run_into_an_interrupt(tiny_models, tmp_path, monkeypatch, capsys):
    import builtins
    import signal

    from lumina_turbo.training import cli

    def print_then_ctrl_c(*args, **kwargs):
        builtins.print(*args, **kwargs)
        if args and str(args[0]).startswith("saved "):
            os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, just after the LoRA was written

    write_concept_dataset(tmp_path / "data", count=2)
    (tmp_path / "t.toml").write_text(TOML.replace("max_train_steps = 3", "max_train_steps = 1"))
    monkeypatch.setattr(cli, "print", print_then_ctrl_c, raising=False)
    # Ctrl-C raises as in a terminal (a job started in the background may have SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert cli.main(["--config", str(tmp_path / "t.toml")]) == 0
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after the guard
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "interrupted" not in capsys.readouterr().err
    import safetensors.torch

    assert safetensors.torch.load_file(tmp_path / "out" / "cli_lora.safetensors")


def test_cli_errors_are_one_line(tmp_path, capsys):
    from lumina_turbo.training.cli import main

    (tmp_path / "t.toml").write_text(TOML)
    assert main(["--config", str(tmp_path / "t.toml")]) == 2  # the dataset folder does not exist
    assert "does not exist" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_example_config_is_valid():
    config = cfg.load_toml(REPO / "configs" / "zimage_turbo_lora.toml")
    assert config.turbo_steps == 8 and config.shift == 3.0 and config.transformer == "Z-Image-Turbo"
