"""A prompt is untrusted input: bad requests against one real server (``main.py`` on a loopback port).

Each case is refused with HTTP 400 naming the input, or fails while executing with an error naming it;
afterwards the server answers the next good prompt, its memory stayed bounded, and nothing outside the
folders a prompt may use was created or changed (file trees compared before/after, in the last test).
Tests run in file order and share the module's server and folders.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from pathlib import Path

import pytest

from lumina_turbo.devtools.comfy_host import COMFY_DIR
from lumina_turbo.devtools.example_dataset import solid_image, write_concept_dataset, write_image
from lumina_turbo.devtools.harness import MODELS_DIR, PromptFailed

pytestmark = pytest.mark.server

FROM_FOLDER = "(from the diffusers folder)"
INPUT_DIR = COMFY_DIR / "input"
LORAS_DIR = MODELS_DIR / "loras"
LORA_FILE = "tiny-random-zimage-lora-diffusers.safetensors"
BAD_NUMBERS = (math.nan, math.inf, -math.inf, 1e30, -1e30)
RSS_GROWTH_LIMIT = 600 << 20  # bytes the server may grow over the whole module (the models load once)
TAG = f"lt_security_{uuid.uuid4().hex[:8]}"


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``root`` (not following symlinks) -> (size, mtime_ns)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            stat = path.lstat()
            found[str(path.relative_to(root))] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns)
    return found


def _top_level(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def _huge_rank_lora(path: Path) -> Path:
    """The tiny Z-Image LoRA with one pair re-declared at a rank worth ~1.6 GB (a sparse file)."""
    import safetensors.torch

    from lumina_turbo.devtools.oversized_files import write_with_declared

    tensors = safetensors.torch.load_file(str(LORAS_DIR / LORA_FILE))
    stem = "transformer.layers.0.attention.to_q"
    up, down = tensors.pop(f"{stem}.lora_B.weight"), tensors.pop(f"{stem}.lora_A.weight")
    rank = 1_600_000_000 // (4 * (up.shape[0] + down.shape[1]))
    declared = {
        f"{stem}.lora_A.weight": ("F32", (rank, down.shape[1])),
        f"{stem}.lora_B.weight": ("F32", (up.shape[0], rank)),
    }
    return write_with_declared(path, tensors, declared)


class World:
    """The module's server, an outside folder a prompt must not reach, and what lay where at the start."""

    def __init__(self, server, outside: Path):
        self.server = server
        self.outside = outside
        self.victim_dataset = write_concept_dataset(outside / "private_dataset", count=1)
        (outside / "private_dataset" / "secret_name_42.txt").write_text("secret")
        # a LoRA listed through a symlinked sub-folder of models/loras/
        (outside / "listed.safetensors").write_bytes((LORAS_DIR / LORA_FILE).read_bytes())
        self.dataset = write_concept_dataset(INPUT_DIR / TAG / "good", count=1)
        self.huge_lora = _huge_rank_lora(LORAS_DIR / f"{TAG}_huge_rank.safetensors")
        self.links = []
        for link, target in (
            (INPUT_DIR / TAG / "escape", outside / "private_dataset"),
            (LORAS_DIR / f"{TAG}_escape", outside),
        ):
            link.symlink_to(target, target_is_directory=True)
            self.links.append(link)
        self.trees_before = self.snapshot()

    def snapshot(self) -> dict:
        return {
            "outside": _tree(self.outside),
            "comfyui": _top_level(COMFY_DIR),
            "above comfyui": _top_level(COMFY_DIR.parent),
            "above that": _top_level(COMFY_DIR.parent.parent),
            "models": _tree(MODELS_DIR),
            "input": _top_level(INPUT_DIR),
        }

    def rss(self, field: str = "VmHWM") -> int:
        """The server's peak resident memory (VmHWM: nothing read and freed in between is missed)."""
        for line in Path(f"/proc/{self.server.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) << 10
        raise AssertionError("no VmRSS")

    def cleanup(self):
        import shutil

        for link in self.links:
            link.unlink(missing_ok=True)
        self.huge_lora.unlink(missing_ok=True)
        shutil.rmtree(INPUT_DIR / TAG, ignore_errors=True)


@pytest.fixture(scope="module")
def world(comfy_server, tmp_path_factory):
    state = World(comfy_server, tmp_path_factory.mktemp("outside_comfyui"))
    try:
        yield state
    finally:
        state.cleanup()


# --- prompts -------------------------------------------------------------------------------------


def _post(world, prompt) -> tuple[int, dict]:
    return world.server.post_json("/prompt", {"prompt": prompt, "client_id": "lumina-turbo-security"})


def _names_input(error: dict, name: str) -> bool:
    """Whether one of ComfyUI's node errors is about ``name`` (not one repeated for every input)."""
    details = str(error.get("details", ""))
    message = details.split(" - ", 1)[1] if " - " in details else details
    # "name must ...", "name: ...", "name, value, ..." (ComfyUI), "start_sigma/end_sigma: ...",
    # "LTLoraTrainer: name must ..."
    return re.match(rf"^(\w+: )?[\w/]*\b{re.escape(name)}\b", message) is not None


def assert_refused(world, prompt: dict, node: str, name: str) -> str:
    """POST /prompt answers 400 with an error of ``node`` about input ``name``; returns the messages."""
    status, body = _post(world, prompt)
    assert status == 400, (status, body)
    errors = body.get("node_errors", {}).get(node, {}).get("errors", [])
    assert any(_names_input(e, name) for e in errors), json.dumps(body)[:3000]
    return json.dumps(body)


def assert_fails(world, prompt: dict, name: str) -> str:
    """The prompt is accepted (a linked value validation cannot see) and fails naming ``name``."""
    with pytest.raises(PromptFailed) as info:
        world.server.run(prompt, timeout=240)
    messages = [
        data.get("exception_message", "")
        for event, data in info.value.details.get("messages", [])
        if event == "execution_error"
    ]
    assert any(m.startswith((f"{name}:", f"{name} ")) for m in messages), str(info.value)[:3000]
    return " ".join(messages)


def loader():
    return {
        "class_type": "LTModelLoader",
        "inputs": {
            "model": "tiny-random-zimage",
            "text_encoder": FROM_FOLDER,
            "vae": FROM_FOLDER,
            "weight_dtype": "default",
        },
    }


def dataset_node(folder, **changes):
    inputs = {
        "folder": folder,
        "vae": ["L", 2],
        "clip": ["L", 1],
        "resolution": 64,
        "bucket_step": 64,
        "enable_bucket": False,
        "caption_dropout": 0.0,
        "system_prompt": "none",
        "num_repeats": 1,
        "max_sequence_length": 32,
    }
    return {"class_type": "LTDataset", "inputs": {**inputs, **changes}}


def with_preview(prompt: dict, node: str, slot: int = 0) -> dict:
    return {**prompt, "P": {"class_type": "PreviewAny", "inputs": {"source": [node, slot]}}}


def primitive(kind: str, value) -> dict:
    return {"class_type": f"Primitive{kind}", "inputs": {"value": value}}


# --- every numeric input of every node, from the server's own /object_info ------------------------


LINKS = {
    "MODEL": ["L", 0],
    "CLIP": ["L", 1],
    "VAE": ["L", 2],
    "CONDITIONING": ["C", 0],
    "LT_DATASET": ["D", 0],
    "LORA_MODEL": ["T", 1],
}


def _default(spec):
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        return options.get("default", kind[0])
    if kind == "COMBO":
        return options.get("default", options["options"][0])
    return options.get("default")


def valid_prompt(info: dict, node_id: str, dataset: str, changes: dict) -> dict:
    """A prompt in which ``node_id`` (node "X") gets its defaults, links for models, and ``changes``."""
    found = info[node_id]
    inputs = {}
    for name, spec in found["input"]["required"].items():
        kind = spec[0]
        inputs[name] = LINKS[kind] if isinstance(kind, str) and kind in LINKS else _default(spec)
    for name, spec in found["input"].get("optional", {}).items():
        if isinstance(spec[0], str) and spec[0] in LINKS:
            inputs[name] = LINKS[spec[0]]  # optional sockets connected: e.g. a negative for cfg > 1
    if node_id == "LTDataset":
        inputs.update(folder=dataset, resolution=64)
    inputs.update(changes)
    prompt = {
        "L": loader(),
        "C": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["L", 1]}},
        "D": dataset_node(dataset),
        "T": {"class_type": "LTLoraTrainer", "inputs": {}},
        "X": {"class_type": node_id, "inputs": inputs},
    }
    trainer = {
        n: LINKS.get(s[0]) if isinstance(s[0], str) and s[0] in LINKS else _default(s)
        for n, s in info["LTLoraTrainer"]["input"]["required"].items()
    }
    prompt["T"]["inputs"] = trainer
    return with_preview(prompt, "X") if found["output"] else prompt


@pytest.fixture(scope="module")
def object_info(world):
    return world.server.get_json("/object_info")


def test_first_good_prompt_runs(world):
    entry = world.server.run(
        {
            "A": {
                "class_type": "LTAnchorScheduler",
                "inputs": {"steps": 4, "shift": 3.0, "convention": "zimage", "denoise": 1.0},
            },
            "P": {"class_type": "PreviewImage", "inputs": {"images": ["A", 1]}},
        }
    )
    assert entry["status"]["status_str"] == "success"
    world.rss_start = world.rss()


def numeric_inputs(object_info: dict) -> list[tuple[str, str]]:
    """(node, input) for every INT / FLOAT input of every node of the pack, from the server's own
    /object_info: a new input is tested the day it is added."""
    found = []
    for node_id, info in sorted(object_info.items()):
        if info.get("python_module") == "custom_nodes.lumina_turbo":
            for group in ("required", "optional"):
                for name, spec in info["input"].get(group, {}).items():
                    if spec[0] in ("INT", "FLOAT"):
                        found.append((node_id, name))
    return found


def test_every_numeric_input_refuses_nan_inf_and_huge(world, object_info):
    cases = numeric_inputs(object_info)
    assert len(cases) >= 30, cases  # every node of the pack is registered
    missed = []
    for node_id, name in cases:
        for value in BAD_NUMBERS:
            prompt = valid_prompt(object_info, node_id, f"{TAG}/good", {name: value})
            try:
                assert_refused(world, prompt, "X", name)
            except AssertionError as error:
                missed.append(f"{node_id}.{name} = {value}: {str(error)[:300]}")
    assert not missed, "\n".join(missed)


def test_linked_numbers_are_checked_when_the_node_runs(world):
    prompt = {
        "N": primitive("Float", math.nan),
        "A": {
            "class_type": "LTAnchorScheduler",
            "inputs": {"steps": 4, "shift": 3.0, "convention": "zimage", "denoise": ["N", 0]},
        },
        "P": {"class_type": "PreviewImage", "inputs": {"images": ["A", 1]}},
    }
    assert_fails(world, prompt, "denoise")
    prompt["N"] = primitive("Float", 1e9)
    prompt["A"]["inputs"].update(denoise=1.0, shift=["N", 0])
    assert_fails(world, prompt, "shift")
    prompt = with_preview(
        {
            "L": loader(),
            "N": primitive("Int", 0),
            "R": {
                "class_type": "LTScaledRoPE",
                "inputs": {"model": ["L", 0], "mode": "time_aware", "train_resolution": ["N", 0]},
            },
        },
        "R",
    )
    assert_fails(world, prompt, "train_resolution")


# --- paths ---------------------------------------------------------------------------------------


def convert_prompt(output_name) -> dict:
    return {
        "N": primitive("String", "unused"),
        "V": {
            "class_type": "LTLoraConvert",
            "inputs": {"lora_name": LORA_FILE, "output_name": output_name, "overwrite": True},
        },
    }


@pytest.mark.parametrize("name", ["../../victim", "../victim", "sub/victim", ".hidden", "/tmp/victim"])
def test_lora_convert_output_name_stays_in_loras(world, name):
    assert_refused(world, convert_prompt(name), "V", "output_name")
    linked = convert_prompt(["N", 0])
    linked["N"]["inputs"]["value"] = name
    assert_fails(world, linked, "output_name")


def test_lora_convert_refuses_a_symlinked_loras_subfolder(world):
    # a LoRA listed through the symlinked sub-folder: its output would land next to it, outside
    prompt = convert_prompt("converted")
    prompt["V"]["inputs"]["lora_name"] = f"{TAG}_escape/listed.safetensors"
    assert_fails(world, prompt, "output_name")


def _outside_folder_cases(world):
    return [
        str(world.victim_dataset),  # absolute, outside
        f"../../{world.outside.name}",  # relative escape
        f"{TAG}/escape",  # a symlink inside input/ that points outside
        "/etc",
    ]


def test_dataset_folder_outside_input_is_refused_without_listing_it(world):
    for folder in _outside_folder_cases(world):
        text = assert_refused(
            world, with_preview({"L": loader(), "D": dataset_node(folder)}, "D"), "D", "folder"
        )
        assert "concept_00" not in text and "secret_name_42" not in text and "passwd" not in text


def test_dataset_folder_linked_outside_input_fails_without_listing_it(world):
    prompt = with_preview(
        {"L": loader(), "N": primitive("String", str(world.victim_dataset)), "D": dataset_node(["N", 0])}, "D"
    )
    text = assert_fails(world, prompt, "folder")
    assert "concept_00" not in text and "secret_name_42" not in text


def test_cache_dir_outside_output_is_refused(world):
    target = str(world.outside / "cache")
    prompt = with_preview({"L": loader(), "D": dataset_node(f"{TAG}/good", cache_dir=target)}, "D")
    assert_refused(world, prompt, "D", "cache_dir")
    prompt["N"] = primitive("String", target)
    prompt["D"]["inputs"]["cache_dir"] = ["N", 0]
    assert_fails(world, prompt, "cache_dir")


def test_undecodable_caption_names_the_file(world):
    folder = INPUT_DIR / TAG / "latin1"
    write_image(folder, "bad", solid_image((1, 0, 0)), "x")
    (folder / "bad.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    text = assert_refused(
        world, with_preview({"L": loader(), "D": dataset_node(f"{TAG}/latin1")}, "D"), "D", "folder"
    )
    assert "bad.txt" in text and "UTF-8" in text


def trainer_prompt(run_name, steps=1) -> dict:
    prompt = {"L": loader(), "D": dataset_node(f"{TAG}/good")}
    prompt["T"] = {
        "class_type": "LTLoraTrainer",
        "inputs": {
            "model": ["L", 0],
            "dataset": ["D", 0],
            "steps": steps,
            "learning_rate": 1e-3,
            "rank": 1,
            "alpha": 1.0,
            "batch_size": 1,
            "gradient_accumulation": 1,
            "seed": 1,
            "timestep_method": "anchor",
            "turbo_steps": 2,
            "shift": 3.0,
            "jitter_scale": 0.0,
            "loss_mode": "standard",
            "snr_gamma": 0.0,
            "replay_ratio": 0.0,
            "curvature_weight": 0.0,
            "train_refiners": False,
            "train_adaln": False,
            "optimizer": "AdamW",
            "lr_scheduler": "constant",
            "warmup_steps": 0,
            "mixed_precision": "fp32",
            "gradient_checkpointing": False,
            "blocks_to_swap": 0,
            "run_name": run_name,
            "checkpoint_every": 0,
            "resume": True,
        },
    }
    return prompt


def test_trainer_run_name_linked_escape_fails(world):
    prompt = with_preview({**trainer_prompt(["N", 0]), "N": primitive("String", "../../escaped_run")}, "T", 3)
    assert_fails(world, prompt, "run_name")


def test_save_lora_through_a_symlink_in_loras_creates_nothing_outside(world):
    prompt = trainer_prompt(f"{TAG}_run")
    prompt["S"] = {
        "class_type": "LTSaveLora",
        "inputs": {
            "lora": ["T", 1],
            "filename_prefix": f"{TAG}_escape/sub/lora",
            "save_dtype": "fp32",
            "format": "comfyui",
        },
    }
    assert_fails(world, prompt, "filename_prefix")
    assert not (world.outside / "sub").exists()
    prompt["N"] = primitive("String", "../../escaped_lora")  # linked: the trainer's result is cached
    prompt["S"]["inputs"]["filename_prefix"] = ["N", 0]
    assert_fails(world, prompt, "filename_prefix")


# --- unknown names -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model", "text_encoder", "vae", "weight_dtype"])
def test_unknown_model_names_are_named(world, name):
    prompt = with_preview({"L": loader()}, "L")
    prompt["L"]["inputs"][name] = "no-such-thing"
    text = assert_refused(world, prompt, "L", name)
    assert "NoneType" not in text


def test_unknown_lora_name_is_named(world):
    prompt = convert_prompt("x")
    prompt["V"]["inputs"]["lora_name"] = "no-such-lora.safetensors"
    assert_refused(world, prompt, "V", "lora_name")


# --- bounded work --------------------------------------------------------------------------------


@pytest.mark.parametrize("denoise", ["1e-5", "5e-324"])
def test_sigma_preview_is_bounded(world, denoise):
    start = time.monotonic()
    answer = world.server.get_json(
        f"/lumina_turbo/sigmas?node=LTAnchorScheduler&steps=1000&shift=3&denoise={denoise}"
    )
    assert time.monotonic() - start < 2.0
    assert answer["error"].startswith("denoise")


def test_huge_layer_lists_are_refused(world):
    prompt = with_preview(
        {
            "L": loader(),
            "X": {
                "class_type": "LTContextDrop",
                "inputs": {
                    "model": ["L", 0],
                    "kernel": 2,
                    "start_sigma": 1.0,
                    "end_sigma": 0.3,
                    "layers": "0-20000000",
                },
            },
        },
        "X",
    )
    assert_refused(world, prompt, "X", "layers")
    prompt["X"]["inputs"]["layers"] = "0-500"  # under the global bound, beyond the tiny model's depth
    assert_fails(world, prompt, "layers")
    prompt["X"]["inputs"]["layers"] = "0-1"
    prompt["X"]["inputs"]["kernel"] = 1000
    assert_refused(world, prompt, "X", "kernel")


def test_oversized_lora_is_refused_from_its_header(world):
    prompt = with_preview(
        {
            "L": loader(),
            "X": {
                "class_type": "LTLoraLoader",
                "inputs": {
                    "model": ["L", 0],
                    "lora_name": world.huge_lora.name,
                    "strength_model": 1.0,
                    "strength_clip": 1.0,
                },
            },
        },
        "X",
        2,
    )
    before = world.rss()
    with pytest.raises(PromptFailed, match=rf"{world.huge_lora.name}: expected a LoRA rank"):
        world.server.run(prompt, timeout=240)
    assert world.rss() - before < 300 << 20  # the declared 1.6 GB were never read


# --- afterwards ----------------------------------------------------------------------------------


def test_server_still_serves_bounded_and_nothing_changed_outside(world):
    entry = world.server.run(
        {
            "A": {
                "class_type": "LTSigmoidScheduler",
                "inputs": {"steps": 5, "slope": 2.0, "center": 0.5, "denoise": 1.0},
            },
            "P": {"class_type": "PreviewImage", "inputs": {"images": ["A", 1]}},
        }
    )
    assert entry["status"]["status_str"] == "success"
    growth = world.rss() - world.rss_start
    print(f"server peak RSS grew by {growth >> 20} MiB over the bad-input suite")
    assert growth < RSS_GROWTH_LIMIT
    after = world.snapshot()
    for name, before in world.trees_before.items():
        assert after[name] == before, name
