"""Example workflows: every API twin has a current UI template and a thumbnail, and the API -> UI
conversion of devtools/build_workflows.py follows the frontend's save format (checked against the
live /object_info). The templates loading and converting back in the real frontend is
tests/test_browser_workflows.py; running them all is `make demo`."""

import copy
import json

import pytest
from PIL import Image

from lumina_turbo.devtools import build_workflows
from lumina_turbo.devtools.build_workflows import API_DIR, THUMBNAIL_SIZE, WORKFLOWS, WorkflowError, api_to_ui

REBUILD = "run `.venv/bin/python -m lumina_turbo.devtools.build_workflows` to regenerate the templates and thumbnails"


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get_json("/object_info")


def test_every_api_twin_has_a_ui_template_and_thumbnail():
    api = {p.stem for p in API_DIR.glob("*.json")}
    assert "zimage_t2i_basic" in api
    assert {p.stem for p in WORKFLOWS.glob("*.json")} == api, REBUILD
    assert {p.stem for p in WORKFLOWS.glob("*.jpg")} == api, REBUILD
    for name in api:
        with Image.open(WORKFLOWS / f"{name}.jpg") as image:
            assert image.format == "JPEG" and image.size == THUMBNAIL_SIZE, name
            assert max(image.convert("L").getextrema()) > 100, f"{name}.jpg is blank"


def test_api_twins_are_valid_prompts(comfy_host):
    for path in sorted(API_DIR.glob("*.json")):
        valid, error, outputs, node_errors = comfy_host.validate(json.loads(path.read_text()))
        assert valid, f"{path.name}: {error} {node_errors}"
        assert outputs, f"{path.name} has no output node"


@pytest.mark.server
def test_ui_templates_are_current(object_info):
    for name, text in build_workflows.build_all(object_info).items():
        assert (WORKFLOWS / f"{name}.json").read_text() == text, f"{name}.json is stale: {REBUILD}"


BASIC = json.loads((API_DIR / "zimage_t2i_basic.json").read_text())


def by_type(workflow, node_type):
    return next(node for node in workflow["nodes"] if node["type"] == node_type)


@pytest.mark.server
def test_widget_order_seed_control_and_typed_links(object_info):
    workflow = api_to_ui(BASIC, object_info, "basic")
    sampler = by_type(workflow, "KSampler")
    # object_info order, with the frontend's control_after_generate value right after the seed.
    assert sampler["widgets_values"] == [42, "fixed", 4, 4.0, "euler", "simple", 1.0]
    assert [i["name"] for i in sampler["inputs"]] == [
        "model",
        "positive",
        "negative",
        "latent_image",
        "seed",
        "steps",
        "cfg",
        "sampler_name",
        "scheduler",
        "denoise",
    ]
    assert all("widget" in i for i in sampler["inputs"][4:]) and not any(
        "widget" in i for i in sampler["inputs"][:4]
    )
    links = {link[0]: link for link in workflow["links"]}
    model_link = links[sampler["inputs"][0]["link"]]
    assert model_link[1:] == [1, 0, sampler["id"], 0, "MODEL"]
    assert by_type(workflow, "LTModelLoader")["outputs"][0]["links"] == [model_link[0]]
    assert by_type(workflow, "SaveImage")["outputs"] == []
    assert workflow["version"] == 0.4 and workflow["last_link_id"] == len(workflow["links"]) == 9
    assert by_type(workflow, "CLIPTextEncode")["title"] == "Positive prompt"


@pytest.mark.server
def test_layout_runs_left_to_right(object_info):
    workflow = api_to_ui(BASIC, object_info, "basic")
    pos = {node["id"]: node["pos"] for node in workflow["nodes"]}
    for _, source, _, target, _, _ in workflow["links"]:
        assert pos[source][0] < pos[target][0]
    order = {node["id"]: node["order"] for node in workflow["nodes"]}
    assert all(order[source] < order[target] for _, source, _, target, _, _ in workflow["links"])


@pytest.mark.server
def test_linked_widget_keeps_a_value_and_ids_are_renumbered(object_info):
    prompt = {f"a{k}": v for k, v in copy.deepcopy(BASIC).items()}
    for entry in prompt.values():
        for name, value in entry["inputs"].items():
            if isinstance(value, list):
                entry["inputs"][name] = [f"a{value[0]}", value[1]]
    prompt["seed"] = {"class_type": "PrimitiveInt", "inputs": {"value": 7}}
    prompt["a5"]["inputs"]["seed"] = ["seed", 0]
    workflow = api_to_ui(prompt, object_info, "renumbered")
    assert sorted(node["id"] for node in workflow["nodes"]) == list(range(1, 9))
    sampler = by_type(workflow, "KSampler")
    seed_input = next(i for i in sampler["inputs"] if i["name"] == "seed")
    assert seed_input["link"] is not None
    assert sampler["widgets_values"][:2] == [0, "fixed"]  # the widget's default stays under the link


@pytest.mark.server
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p["5"].update(class_type="NoSuchNode"), "node 5 .*no node 'NoSuchNode'"),
        (lambda p: p["5"]["inputs"].update(stepz=3), r"inputs \['stepz'\] are not inputs"),
        (lambda p: p["6"]["inputs"].update(samples=["99", 0]), "links to missing node '99'"),
        (lambda p: p["6"]["inputs"].update(samples=["5", 3]), "output 3 of node 5, which has 1 outputs"),
    ],
)
def test_bad_api_twins_are_refused_by_name(object_info, change, message):
    prompt = copy.deepcopy(BASIC)
    change(prompt)
    with pytest.raises(WorkflowError, match=message):
        api_to_ui(prompt, object_info, "bad")
