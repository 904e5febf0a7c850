"""The schema-derived input check and the path policy, in this process (the server suite is test_security.py)."""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module", autouse=True)
def pack(comfy_host):
    """ComfyUI's modules, imported once the host fixture has set ComfyUI up (not at collection: an
    early import would put this repository's nodes/ package ahead of ComfyUI's nodes.py)."""
    global folder_paths, all_nodes, paths, input_error, is_checked, LTLoraLoader, LTAnchorScheduler
    import folder_paths

    from lumina_turbo.nodes import all_nodes, paths
    from lumina_turbo.nodes.input_checks import input_error, is_checked
    from lumina_turbo.nodes.lora import LTLoraLoader
    from lumina_turbo.nodes.schedules import LTAnchorScheduler

    return comfy_host


def test_every_node_checks_its_inputs_on_both_paths():
    nodes = all_nodes()
    assert len(nodes) >= 13
    for node in nodes:
        _check_node(node)


def _check_node(node):
    assert is_checked(node.execute), f"{node.__name__}.execute lacks @checked_execution"
    assert is_checked(node.validate_inputs), f"{node.__name__}.validate_inputs lacks @checked_validation"
    # ComfyUI reads the argspec: **inputs makes it hand every input over (and skip its own range checks)
    assert inspect.getfullargspec(node.validate_inputs).varkw is not None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"steps": 0}, "steps must be a whole number >= 1 and <= 10000"),
        ({"steps": True}, "steps must be a whole number"),
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"shift": math.nan}, "shift must be a finite number between 0.01 and 100.0"),
        ({"shift": math.inf}, "shift must be a finite number"),
        ({"shift": 1e9}, "shift must be between 0.01 and 100.0"),
        ({"convention": "sd3"}, "convention must be one of ['zimage', 'diffusers']"),
        ({"convention": None, "steps": None}, None),  # linked, during validation
        ({"steps": 8, "shift": 3.0, "convention": "zimage", "denoise": 0.5}, None),
    ],
)
def test_input_error_reads_the_schema(values, message):
    error = input_error(LTAnchorScheduler, values)
    assert error == message if message is None else error.startswith(message), error


def test_execute_refuses_a_linked_combo_value_outside_its_list(tiny_models):
    # a custom node may feed any string into a combo socket: execute checks it against the list
    with pytest.raises(ValueError, match=r"lora_name must be one of"):
        LTLoraLoader.execute(
            model=None, lora_name="../../secret.safetensors", strength_model=1.0, strength_clip=1.0
        )
    with pytest.raises(ValueError, match=r"strength_model must be a finite number"):
        LTLoraLoader.execute(
            model=None,
            lora_name=folder_paths.get_filename_list("loras")[0],
            strength_model=math.nan,
            strength_clip=1.0,
        )


def test_validation_result_is_the_nodes_own_message_first():
    assert LTAnchorScheduler.validate_inputs(steps=0, shift=3.0, convention="zimage", denoise=1.0).startswith(
        "steps must be between 1 and 10000"
    )
    assert LTAnchorScheduler.validate_inputs(
        steps=8, shift=math.nan, convention="zimage", denoise=1.0
    ).startswith("shift must be a finite number")
    message = LTAnchorScheduler.validate_inputs(steps=1000, shift=3.0, convention="zimage", denoise=1e-5)
    assert message.startswith("denoise 1e-05 with 1000 steps needs a schedule of 1e+08 steps; at most 100000")


# --- the path policy -----------------------------------------------------------------------------


@pytest.fixture
def no_opt_in(monkeypatch):
    monkeypatch.delenv(paths.TRAINING_ROOTS_ENV, raising=False)


def test_dataset_folder_must_lie_under_input(no_opt_in, tmp_path):
    inside = Path(folder_paths.get_input_directory())
    assert paths.dataset_folder("some/dataset") == (inside / "some" / "dataset").resolve()
    assert paths.dataset_folder("~") == (inside / "~").resolve()  # no expanduser: a name like any other
    for value in (str(tmp_path), "../models", "/etc", "a/../../x"):
        with pytest.raises(paths.PathRefused, match=r"^folder: .* outside the folders it may use"):
            paths.dataset_folder(value)
    with pytest.raises(paths.PathRefused, match="^folder: empty"):
        paths.dataset_folder("  ")


def test_training_roots_are_a_server_side_opt_in(monkeypatch, tmp_path):
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    allowed.mkdir()
    other.mkdir()
    monkeypatch.setenv(paths.TRAINING_ROOTS_ENV, os.pathsep.join([str(allowed), "relative/ignored"]))
    assert paths.dataset_folder(str(allowed / "set")) == (allowed / "set").resolve()
    assert paths.cache_folder(str(allowed / "cache")) == (allowed / "cache").resolve()
    with pytest.raises(paths.PathRefused, match=paths.TRAINING_ROOTS_ENV):
        paths.dataset_folder(str(other))
    (allowed / "link").symlink_to(other, target_is_directory=True)
    with pytest.raises(paths.PathRefused):  # symlinks are resolved before the check
        paths.dataset_folder(str(allowed / "link"))
    assert paths.training_roots() == [allowed.resolve()]


def test_cache_dir_must_lie_under_output(no_opt_in, tmp_path):
    output = Path(folder_paths.get_output_directory())
    assert paths.cache_folder("my_cache") == (output / "my_cache").resolve()
    with pytest.raises(paths.PathRefused, match="^cache_dir: "):
        paths.cache_folder(str(tmp_path))


def test_lora_file_writes_stay_in_the_loras_folder(tmp_path):
    from lumina_turbo.training.save import next_free_path

    loras = tmp_path / "loras"
    outside = tmp_path / "outside"
    loras.mkdir()
    outside.mkdir()
    (loras / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="^filename_prefix: "):
        next_free_path(loras, "escape/new_folder/lora")
    assert list(outside.iterdir()) == []  # refused before any folder was created
    assert next_free_path(loras, "mine/lora") == loras / "mine" / "lora_00001_.safetensors"
    for name in ("../x", "a/b", ".hidden", "x\\y"):
        with pytest.raises(paths.PathRefused, match="^output_name: "):
            paths.plain_file_name(name, "output_name")


def test_dataset_images_linked_from_outside_are_refused(no_opt_in, tmp_path):
    import shutil
    import uuid

    from lumina_turbo.devtools.example_dataset import solid_image, write_image
    from lumina_turbo.nodes.training import _scan

    secret = write_image(tmp_path, "secret_picture", solid_image((1, 0, 0)), "private")
    folder = Path(folder_paths.get_input_directory()) / f"lt_links_{uuid.uuid4().hex[:8]}"
    try:
        write_image(folder, "own", solid_image((0, 1, 0)), "mine")
        (folder / "borrowed.png").symlink_to(secret)
        (folder / "borrowed.txt").write_text("caption")
        with pytest.raises(
            paths.PathRefused, match=r"^folder: 1 file\(s\) in the folder link outside"
        ) as info:
            _scan(folder.name)
        assert "secret_picture" not in str(info.value)
    finally:
        shutil.rmtree(folder)
