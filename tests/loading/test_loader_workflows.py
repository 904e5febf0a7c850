"""The loader's example workflows (example_workflows/api/) run end to end: the diffusers-folder one
through the in-process executor, the single-files one on a real server (POST /prompt, /view)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from lumina_turbo.devtools.harness import REPO

API_DIR = REPO / "example_workflows" / "api"


def workflow(name):
    return json.loads((API_DIR / f"{name}.json").read_text())


def assert_image(png: bytes):
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0.5, "a flat or empty image"


def test_lumina2_folder_workflow_in_process(comfy_host):
    prompt = workflow("lumina2_t2i")
    assert (
        prompt["1"]["inputs"]["text_encoder"] == prompt["1"]["inputs"]["vae"] == "(from the diffusers folder)"
    )
    (path,) = comfy_host.image_paths(comfy_host.run(prompt))
    assert_image(path.read_bytes())


@pytest.mark.server
def test_zimage_single_files_workflow_on_server(comfy_server):
    prompt = workflow("zimage_t2i_single_files")
    assert prompt["1"]["inputs"]["model"].endswith(".safetensors")
    entry = comfy_server.run(prompt)
    (image,) = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert_image(comfy_server.view(image))
