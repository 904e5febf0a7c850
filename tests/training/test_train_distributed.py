"""Several processes train one run: the real command under torchrun (and accelerate launch) as 2 gloo CPU
processes on the tiny Z-Image model, compared with one process, with itself resumed, and refused when
the setup cannot make one run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

from lumina_turbo.devtools import distributed_runs as runs
from lumina_turbo.devtools.example_dataset import concept_image, write_concept_dataset, write_image

pytestmark = pytest.mark.slow  # each launch imports ComfyUI in every process (~10 s on 2 cores)


def write_data(folder, count=3):
    """``count`` square concept images and two wide ones with another caption (two buckets, so replays
    mix latent sizes within a micro-batch)."""
    write_concept_dataset(folder, count=count)
    for index in range(2):
        write_image(
            folder, f"wide_{index}", concept_image(index, (128, 64), seed=3), "a wide red and blue banner"
        )


def lora(folder, name="my_zimage_turbo_lora"):
    return safetensors.torch.load_file(folder / "out" / f"{name}.safetensors")


def checkpoint(folder, name="ckpt"):
    return torch.load(folder / name / "training_state.pt", weights_only=True)


def assert_ok(done):
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


# Every randomness source on: AC-RF anchors with jitter, replay (uneven shares: 2 scheduled + replays),
# caption dropout, latent jitter, Min-SNR, clipping, accumulation; 5 items and a global batch of 2 leave
# a last batch of one item, so one rank also trains an empty share.
EQUIVALENCE = dict(
    training__max_train_steps="4",
    training__gradient_accumulation_steps="2",
    acrf__replay_ratio="0.5",
    acrf__replay_min_entries="2",
    acrf__latent_jitter_scale="0.01",
    advanced__mixed_precision='"fp32"',
)


@pytest.fixture(scope="module")
def two_and_one(tiny_models, tmp_path_factory):
    """The example TOML trained by torchrun with 2 processes x batch 1, then by 1 process x batch 2."""
    root = tmp_path_factory.mktemp("equivalence")
    write_data(root / "data")
    two = root / "two.toml"
    two.write_text(
        runs.example_toml(**EQUIVALENCE, model__output_name='"two"', training__checkpoint_dir='"c2"')
    )
    one = root / "one.toml"
    one.write_text(
        runs.example_toml(
            **EQUIVALENCE,
            model__output_name='"one"',
            training__checkpoint_dir='"c1"',
            dataset__batch_size="2",
        )
    )
    two_done = runs.run(runs.torchrun(2, two))
    assert_ok(two_done)
    one_done = runs.run(runs.single(one))
    assert_ok(one_done)
    return root, two_done, one_done


def test_two_processes_train_like_one_with_twice_the_batch(two_and_one):
    root, two_done, one_done = two_and_one
    two, one = lora(root, "two"), lora(root, "one")
    assert runs.lora_difference(two, one) <= 1e-5
    assert not all(torch.equal(two[k], one[k]) for k in two)  # really two runs (summation order differs)
    two_state, one_state = checkpoint(root, "c2"), checkpoint(root, "c1")
    torch.testing.assert_close(
        torch.tensor(two_state["loss_history"]), torch.tensor(one_state["loss_history"]), rtol=1e-5, atol=0
    )
    assert two_state["world_size"] == 2 and len(two_state["generators"]) == 2
    # the data cache was encoded once, split between the ranks; the single process only read it
    assert "5 images, latents 5 encoded / 0 cached, captions 3 encoded / 0 cached" in two_done.stdout
    assert (
        len(list((root / "cache").rglob("*.safetensors"))) == 5 + 3
    )  # 5 latents, 2 captions + the empty one
    assert "latents 0 encoded / 5 cached, captions 0 encoded" in one_done.stdout
    # rank 0 alone reports and writes
    assert two_done.stdout.count("saved ") == 1 and two_done.stdout.count("dataset: ") == 1


def test_accelerate_launch_runs_the_same_two_processes(two_and_one):
    root, _, _ = two_and_one
    toml = root / "accelerate.toml"
    toml.write_text(
        runs.example_toml(**EQUIVALENCE, model__output_name='"acc"', training__checkpoint_dir='"ca"')
    )
    done = runs.run(runs.accelerate_launch(2, toml))
    assert_ok(done)
    assert "(2 processes)" in done.stdout
    accelerated, torchran = lora(root, "acc"), lora(root, "two")
    assert all(torch.equal(accelerated[k], torchran[k]) for k in torchran)


def test_interrupted_two_process_run_resumes_bit_exactly(tiny_models, tmp_path):
    write_data(tmp_path / "data")
    steps = "16"
    straight = tmp_path / "straight.toml"
    straight.write_text(
        runs.example_toml(
            training__max_train_steps=steps,
            training__save_every_n_steps="1",
            model__output_name='"straight"',
            training__checkpoint_dir='"c_straight"',
        )
    )
    resumed = tmp_path / "resumed.toml"
    resumed.write_text(
        runs.example_toml(
            training__max_train_steps=steps,
            training__save_every_n_steps="1",
            model__output_name='"resumed"',
            training__checkpoint_dir='"c_resumed"',
        )
    )
    assert_ok(runs.run(runs.torchrun(2, straight)))  # also fills the cache the other run reads

    # Ctrl-C (SIGINT to the launcher and its workers) as soon as the first checkpoint exists
    launcher = subprocess.Popen(
        runs.torchrun(2, resumed),
        env=runs.cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=runs.REPO,
    )
    deadline = time.monotonic() + 240
    while not (tmp_path / "c_resumed" / "training_state.pt").is_file() and launcher.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.killpg(launcher.pid, signal.SIGINT)
    _, err = launcher.communicate(timeout=120)
    stopped_at = checkpoint(tmp_path, "c_resumed")["step"]
    assert 0 < stopped_at < int(steps), (stopped_at, err[-2000:])
    assert launcher.returncode != 0

    done = runs.run(runs.torchrun(2, resumed))
    assert_ok(done)
    assert f"resumed at {stopped_at}" in done.stdout
    a, b = lora(tmp_path, "resumed"), lora(tmp_path, "straight")
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert (
        checkpoint(tmp_path, "c_resumed")["loss_history"]
        == checkpoint(tmp_path, "c_straight")["loss_history"]
    )

    # the same checkpoint cannot continue with another number of processes
    refused = runs.run(runs.single(resumed))
    assert refused.returncode == 2
    assert (
        "was written by 2 process(es), this run has 1" in refused.stderr and "Traceback" not in refused.stderr
    )


def test_bad_setups_are_refused_with_clear_errors(tiny_models, tmp_path):
    write_concept_dataset(tmp_path / "data", count=1)
    toml = tmp_path / "t.toml"
    toml.write_text(runs.example_toml())

    # more processes than items
    done = runs.run(runs.torchrun(2, toml))
    assert done.returncode != 0
    assert "1 image(s) (repeats included) for 2 processes" in done.stderr, done.stderr[-3000:]

    # a backend this machine lacks
    done = runs.run(runs.torchrun(2, toml), LUMINA_TURBO_DIST_BACKEND="nccl")
    assert done.returncode != 0
    assert "LUMINA_TURBO_DIST_BACKEND=nccl: that torch.distributed backend is not available" in done.stderr

    # a launcher environment without the rendezvous address
    done = runs.run(runs.single(toml), RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    assert done.returncode == 2
    assert "lacks MASTER_ADDR, MASTER_PORT" in done.stderr and "Traceback" not in done.stderr

    # accelerate launch --cpu with several processes starts one process without a rank
    done = runs.run(
        runs.single(toml), ACCELERATE_MIXED_PRECISION="no", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500"
    )
    assert done.returncode == 2 and "accelerate launch --multi_gpu --num_processes N" in done.stderr

    # ranks given different configs (e.g. another TOML on a second machine)
    write_concept_dataset(tmp_path / "data", count=2)
    other = tmp_path / "other.toml"
    other.write_text(runs.example_toml(training__learning_rate="2e-3"))
    ranks = runs.start_ranks([toml, other], LUMINA_TURBO_DIST_TIMEOUT="60")
    for process in ranks:
        _, err = process.communicate(timeout=180)
        assert process.returncode == 2, err[-3000:]
        assert "were given different configs (ranks [0]; ranks [1] agree among themselves)" in err


def test_a_dead_rank_stops_the_other_and_keeps_the_checkpoint(tiny_models, tmp_path):
    write_data(tmp_path / "data")
    toml = tmp_path / "t.toml"
    toml.write_text(runs.example_toml(training__max_train_steps="400", training__save_every_n_steps="1"))
    rank0, rank1 = runs.start_ranks([toml, toml], LUMINA_TURBO_DIST_TIMEOUT="30")
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "ckpt" / "training_state.pt").is_file():
            assert rank0.poll() is None and time.monotonic() < deadline, rank0.stderr.read()[-3000:]
            time.sleep(0.05)
        rank1.kill()
        killed = time.monotonic()
        _, err = rank0.communicate(timeout=90)
        assert time.monotonic() - killed < 45
    finally:
        for process in (rank0, rank1):
            if process.poll() is None:
                process.kill()
            process.communicate()
    assert rank0.returncode == 4, err[-3000:]
    assert "another process stopped or did not answer within 30 s" in err
    assert "The last checkpoint in" in err and "is intact" in err
    assert 0 < checkpoint(tmp_path)["step"] < 400


# The trainer's own main(), then the names of the threads still running before the interpreter's exit.
MAIN_THEN_THREADS = """
import os, sys
from lumina_turbo.training.cli import main
code = main(sys.argv[1:])
names = {open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")}
print("threads left:", sorted(names))
sys.exit(code)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from /proc")
def test_a_finished_run_leaves_no_backend_threads_for_the_exit(tiny_models, tmp_path):
    """ComfyUI's model code imports torch modules that bind the default process group as an argument
    default; had they bound the live group, gloo's threads would outlive destroy_process_group and the
    interpreter's exit could abort a finished run (seen as SIGABRT under load)."""
    write_data(tmp_path / "data")
    toml = tmp_path / "t.toml"
    toml.write_text(runs.example_toml())
    ranks = runs.start_ranks([toml, toml], program=[sys.executable, "-c", MAIN_THEN_THREADS])
    for process in ranks:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, err[-3000:]
        left = out.split("threads left:")[-1]
        assert "gloo" not in left, left
