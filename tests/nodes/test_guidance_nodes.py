"""LTCFGGuider and LTCFGPatch through ComfyUI's real executor (and one prompt on the real server).

Stock nodes around ours: LTModelLoader -> text encoders -> LTCFGGuider + KSamplerSelect + BasicScheduler +
RandomNoise -> SamplerCustomAdvanced, or LTCFGPatch -> KSampler; SaveLatent lets the test read the result.
"""

import json

import pytest
import torch

from lumina_turbo.devtools.guidance_counting import RowCounter
from lumina_turbo.devtools.harness import REPO, PromptFailed, graph
from lumina_turbo.devtools.prompts import empty_latent, encode, ksampler, save_latent, tiny_loader

EXAMPLES = ["lumina2_renorm_truncation", "zimage_cfg_truncation", "zimage_turbo_cfg1"]
OPTIONS = dict(
    renorm=1.0,
    renorm_mode="cap",
    trunc_mode="step_fraction",
    trunc=0.5,
    after_trunc="cond",
    cfg_formula="comfy",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: a second OpenMP thread only adds spin-waiting on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def text_to_latent(family, path, cfg=4.0, options=None, steps=4, batch=1, negative=True, prefix="guidance"):
    """One prompt: ``path`` is 'guider' (LTCFGGuider + SamplerCustomAdvanced), 'patch' (LTCFGPatch + KSampler)
    or 'stock' (ComfyUI's CFGGuider + SamplerCustomAdvanced)."""
    options = {**OPTIONS, **(options or {})}
    g = graph()
    loader = tiny_loader(g, family)
    pos, neg = encode(g, family, loader.out(1), "a red cat"), encode(g, family, loader.out(1), "blurry")
    latent = empty_latent(g, 64, 64, batch)
    if path == "patch":
        patched = g.node("LTCFGPatch", model=loader.out(0), **options)
        sampled = ksampler(
            g, patched.out(0), pos.out(0), neg.out(0), latent.out(0), seed=3, steps=steps, cfg=cfg
        )
    else:
        if path == "guider":
            extra = {"negative": neg.out(0)} if negative else {}
            guider = g.node(
                "LTCFGGuider", model=loader.out(0), positive=pos.out(0), cfg=cfg, **options, **extra
            )
        else:
            guider = g.node(
                "CFGGuider", model=loader.out(0), positive=pos.out(0), negative=neg.out(0), cfg=cfg
            )
        sampled = g.node(
            "SamplerCustomAdvanced",
            noise=g.node("RandomNoise", noise_seed=3).out(0),
            guider=guider.out(0),
            sampler=g.node("KSamplerSelect", sampler_name="euler").out(0),
            sigmas=g.node(
                "BasicScheduler", model=loader.out(0), scheduler="simple", steps=steps, denoise=1.0
            ).out(0),
            latent_image=latent.out(0),
        )
    save_latent(g, sampled.out(0), f"{prefix}_{family}_{path}")
    return g.finalize()


def run_latent(host, prompt) -> torch.Tensor:
    return host.latent(host.run(prompt))


def test_nodes_registered_with_docs(comfy_host):
    import nodes

    for node_id in ("LTCFGGuider", "LTCFGPatch"):
        assert node_id in comfy_host.node_ids
        node = nodes.NODE_CLASS_MAPPINGS[node_id]
        schema = node.GET_SCHEMA()
        assert schema.description and schema.category.startswith("LuminaTurbo/")
        assert all(i.tooltip for i in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]
        assert (REPO / "web" / "docs" / f"{node_id}.md").is_file()
    names = [i.id for i in nodes.NODE_CLASS_MAPPINGS["LTCFGGuider"].GET_SCHEMA().inputs]
    assert names == [
        "model",
        "positive",
        "negative",
        "cfg",
        "renorm",
        "renorm_mode",
        "trunc_mode",
        "trunc",
        "after_trunc",
        "cfg_formula",
    ]


@pytest.mark.parametrize("family, cfg, cfg_formula", [("lumina2", 4.0, "comfy"), ("zimage", 3.0, "zimage")])
def test_guider_and_patch_agree_through_executor(comfy_host, family, cfg, cfg_formula):
    options = {"cfg_formula": cfg_formula}
    guided = run_latent(comfy_host, text_to_latent(family, "guider", cfg, options))
    patched = run_latent(comfy_host, text_to_latent(family, "patch", cfg, options))
    assert guided.shape == (1, 16, 8, 8) and torch.isfinite(guided).all()
    assert (guided - patched).abs().max() < 1e-5 * guided.abs().max()
    untruncated = run_latent(
        comfy_host, text_to_latent(family, "guider", cfg, {**options, "trunc_mode": "off"})
    )
    assert (guided - untruncated).abs().max() > 1e-2


def test_plain_settings_equal_stock_cfg_guider(comfy_host):
    plain = {"renorm_mode": "off", "trunc_mode": "off"}
    ours = run_latent(comfy_host, text_to_latent("lumina2", "guider", 4.0, plain))
    stock = run_latent(comfy_host, text_to_latent("lumina2", "stock", 4.0))
    assert (ours - stock).abs().max() < 1e-5 * stock.abs().max()  # float rounding only


def test_patch_batch2_through_executor(comfy_host):
    latents = run_latent(comfy_host, text_to_latent("lumina2", "patch", 4.0, {"renorm_mode": "cap"}, batch=2))
    assert latents.shape[0] == 2 and torch.isfinite(latents).all()
    assert (latents[0] - latents[1]).abs().max() > 1e-3


def test_no_negative_at_cfg_1(comfy_host):
    latents = run_latent(
        comfy_host, text_to_latent("zimage", "guider", 1.0, {"trunc_mode": "off"}, negative=False)
    )
    assert torch.isfinite(latents).all()


def _refused(host, prompt, pattern):
    with pytest.raises(PromptFailed, match=pattern) as info:
        host.run(prompt)
    assert "refused" in str(info.value)  # by validation, before anything ran


@pytest.mark.parametrize(
    "path, cfg, options, negative, pattern",
    [
        ("guider", -1.0, {}, True, r"cfg must be >= 0, got -1"),
        ("guider", 4.0, {"trunc": 1.5}, True, r"trunc for trunc_mode 'step_fraction' must be in \[0, 1\]"),
        (
            "guider",
            4.0,
            {"trunc_mode": "last_steps", "trunc": 2.5},
            True,
            r"trunc for trunc_mode 'last_steps'",
        ),
        ("guider", 4.0, {"trunc_mode": "cfg_trunc"}, True, r"trunc_mode must be one of"),
        ("guider", 4.0, {"renorm": -0.5}, True, r"renorm must be >= 0"),
        ("guider", 4.0, {"after_trunc": "both"}, True, r"after_trunc must be one of"),
        ("guider", 4.0, {}, False, r"negative: not connected"),
        ("guider", 1.0, {"after_trunc": "uncond"}, False, r"negative: not connected"),
        ("guider", 1.0, {"cfg_formula": "zimage"}, False, r"negative: not connected"),  # zimage g=1 guides
        ("patch", 4.0, {"trunc_mode": "sigma", "trunc": 1.2}, True, r"trunc for trunc_mode 'sigma'"),
        ("patch", 4.0, {"renorm_mode": "clip"}, True, r"renorm_mode must be one of"),
    ],
)
def test_bad_input_refused_before_sampling(comfy_host, path, cfg, options, negative, pattern):
    _refused(comfy_host, text_to_latent("lumina2", path, cfg, options, negative=negative), pattern)


def test_valid_prompt_without_negative_passes_validation(comfy_host):
    prompt = text_to_latent("zimage", "guider", 0.0, {"cfg_formula": "zimage"}, negative=False)
    assert comfy_host.validate(prompt)[0] is True


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_workflows_validate(comfy_host, name):
    prompt = json.loads((REPO / "example_workflows" / "api" / f"{name}.json").read_text())
    valid, error, _, node_errors = comfy_host.validate(prompt)
    assert valid, (error, node_errors)


def test_turbo_example_runs_one_pass_per_step(comfy_host):
    """The example as shipped (8 euler steps, cfg 1, no negative): one 1-row transformer pass per step."""
    from comfy.ldm.lumina.model import NextDiT

    prompt = json.loads((REPO / "example_workflows" / "api" / "zimage_turbo_cfg1.json").read_text())
    assert "negative" not in prompt["3"]["inputs"]
    assert prompt["5"]["inputs"]["steps"] == 8
    prompt["6"]["inputs"]["noise_seed"] = 12345  # not what another test ran: the sampler must run here
    counter = RowCounter()

    def count_transformer(module, args, kwargs, output):
        if isinstance(module, NextDiT):
            counter.forward_hook(module, args, kwargs, output)

    # the model is built inside the prompt, so no wrapper can be put on it beforehand
    hook = torch.nn.modules.module.register_module_forward_hook(count_transformer, with_kwargs=True)
    try:
        (path,) = comfy_host.image_paths(comfy_host.run(prompt))
    finally:
        hook.remove()
    assert path.is_file()
    assert [(branches, rows) for _, branches, rows in counter.forwards] == [((0,), 1)] * 8


@pytest.mark.server
def test_server_runs_lumina2_example(comfy_server):
    info = comfy_server.get_json("/object_info/LTCFGGuider")["LTCFGGuider"]
    assert "negative" in info["input"]["optional"]
    assert info["input"]["required"]["trunc_mode"][1]["options"] == [
        "off",
        "step_fraction",
        "lumina_t",
        "zimage",
        "sigma",
        "last_steps",
    ]
    prompt = json.loads((REPO / "example_workflows" / "api" / "lumina2_renorm_truncation.json").read_text())
    prompt["6"]["inputs"]["steps"] = 8
    entry = comfy_server.run(prompt)
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert len(images) == 1 and comfy_server.view(images[0])[:4] == b"\x89PNG"
    prompt["4"]["inputs"]["cfg"] = -1.0
    status, body = comfy_server.post_json("/prompt", {"prompt": prompt})
    assert status == 400 and "cfg must be >= 0" in json.dumps(body["node_errors"]["4"])
