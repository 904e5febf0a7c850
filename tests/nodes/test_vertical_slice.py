"""The foundation's vertical slice: tiny models sampled through stock ComfyUI nodes.

LTModelLoader -> text encode -> EmptySD3LatentImage -> stock KSampler -> VAEDecode -> SaveImage,
in-process through the real PromptExecutor and on a real server through POST /prompt.
"""

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from lumina_turbo.devtools.harness import graph
from lumina_turbo.devtools.prompts import (
    FROM_FOLDER,
    decode_and_save,
    empty_latent,
    encode,
    ksampler,
    tiny_loader,
)


def t2i_prompt(family, source="folder", steps=2, cfg=2.0, seed=1, prefix="slice"):
    g = graph()
    loader = tiny_loader(g, family, source)
    pos, neg = encode(g, family, loader.out(1), "a red cat"), encode(g, family, loader.out(1), "blurry")
    sampled = ksampler(g, loader.out(0), pos.out(0), neg.out(0), empty_latent(g).out(0), seed=seed,
                       steps=steps, cfg=cfg)  # fmt: skip
    decode_and_save(g, sampled.out(0), loader.out(2), f"{prefix}_{family}_{source}")
    return g.finalize()


def assert_real_image(png: bytes, size=(64, 48)):
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    assert image.shape == (size[1], size[0], 3)
    assert np.isfinite(image).all() and image.std() > 0.5, "a flat or empty image"
    return image


def test_pack_loaded_by_comfy_loader(comfy_host):
    assert "LTModelLoader" in comfy_host.node_ids


@pytest.mark.parametrize("family", ["lumina2", "zimage"])
@pytest.mark.parametrize("source", ["folder", "single"])
def test_in_process_prompt(comfy_host, family, source):
    outputs = comfy_host.run(t2i_prompt(family, source))
    (path,) = comfy_host.image_paths(outputs)
    assert_real_image(path.read_bytes())


def test_in_process_seed_reproducible(comfy_host):
    first = comfy_host.image_paths(comfy_host.run(t2i_prompt("zimage", seed=5, prefix="a")))[0]
    second = comfy_host.image_paths(comfy_host.run(t2i_prompt("zimage", seed=5, prefix="b")))[0]
    other = comfy_host.image_paths(comfy_host.run(t2i_prompt("zimage", seed=6, prefix="c")))[0]
    a, b, c = (assert_real_image(p.read_bytes()) for p in (first, second, other))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_in_process_prompt_under_a_running_event_loop(comfy_host):
    """The harness also runs prompts where the thread already has a running loop, as it has while
    playwright's sync API holds a browser open (CI failed on that once)."""

    async def queue_from_inside_a_loop():
        return comfy_host.run(t2i_prompt("zimage", prefix="in_loop"))

    (path,) = comfy_host.image_paths(asyncio.run(queue_from_inside_a_loop()))
    assert_real_image(path.read_bytes())


def test_single_file_without_text_encoder_is_refused(comfy_host):
    from lumina_turbo.devtools.harness import PromptFailed

    prompt = t2i_prompt("zimage", "single")
    loader_id = next(k for k, v in prompt.items() if v["class_type"] == "LTModelLoader")
    prompt[loader_id]["inputs"]["text_encoder"] = FROM_FOLDER
    with pytest.raises(PromptFailed, match="single transformer file"):
        comfy_host.run(prompt)


@pytest.mark.server
@pytest.mark.parametrize("family", ["lumina2", "zimage"])
def test_server_prompt(comfy_server, family):
    info = comfy_server.get_json("/object_info/LTModelLoader")
    model_input = info["LTModelLoader"]["input"]["required"]["model"]
    assert model_input[0] == "COMBO" and f"tiny-random-{family}" in model_input[1]["options"]
    entry = comfy_server.run(t2i_prompt(family, "folder", prefix="server"))
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert len(images) == 1
    assert_real_image(comfy_server.view(images[0]))


@pytest.mark.server
def test_server_rejects_bad_prompt(comfy_server):
    prompt = t2i_prompt("zimage")
    loader_id = next(k for k, v in prompt.items() if v["class_type"] == "LTModelLoader")
    prompt[loader_id]["inputs"]["model"] = "no-such-model"
    status, body = comfy_server.post_json("/prompt", {"prompt": prompt})
    assert status == 400
    assert loader_id in body["node_errors"]
