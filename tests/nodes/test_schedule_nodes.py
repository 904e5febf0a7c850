"""Schedule nodes and the flow midpoint sampler inside ComfyUI: oracles, stock lists, executor, server.

The solver's order of convergence and the pure schedules are covered by tests/unit/; here the nodes,
the stock-list registration and the sampling paths are checked through ComfyUI's real executor and
compared with the pure functions called directly on the same tiny model, noise and sigmas.
"""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from lumina_turbo.devtools.harness import REPO, PromptFailed
from lumina_turbo.samplers.flow_solvers import sample_flow_midpoint
from lumina_turbo.samplers.schedules import anchor_sigmas, sigmoid_sigmas

EXAMPLES = REPO / "example_workflows" / "api"
OUR_SCHEDULERS = ("lt_sigmoid", "lt_anchor")
ZIMAGE_TURBO_8 = [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0]


def node_class(node_id):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[node_id]


def call_node(node_id, **inputs):
    """Run a node's function directly (V1 or V3), as ComfyUI would, and return its outputs."""
    cls = node_class(node_id)
    if hasattr(cls, "define_schema"):
        return cls.execute(**inputs).args
    return getattr(cls(), cls.FUNCTION)(**inputs)


def flow_model_sampling(shift):
    import comfy.model_sampling as ms

    class FlowSampling(ms.ModelSamplingDiscreteFlow, ms.CONST):
        pass

    sampling = FlowSampling()
    sampling.set_parameters(shift=shift, multiplier=1.0)
    return sampling


def with_saved_latent(prompt, sampler_node, prefix):
    prompt = json.loads(json.dumps(prompt))
    prompt["latent"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": [sampler_node, 0], "filename_prefix": f"latents/{prefix}"},
    }
    return prompt


def assert_plot(image):
    assert image.shape == (1, 400, 640, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.std()) > 0.05


def reference_sample(loader_inputs, encode, cfg, sigmas, seed, size=(128, 128)):
    """The pure sample_flow_midpoint on the same model, conds, noise and sigmas, via comfy.sample."""
    import comfy.sample
    import comfy.samplers

    model, clip, _ = call_node("LTModelLoader", **loader_inputs)
    positive, negative = encode(clip)
    (latent,) = call_node("EmptySD3LatentImage", width=size[0], height=size[1], batch_size=1)
    noise = comfy.sample.prepare_noise(latent["samples"], seed)
    sampler = comfy.samplers.KSAMPLER(sample_flow_midpoint)
    return comfy.sample.sample_custom(
        model,
        noise,
        cfg,
        sampler,
        sigmas,
        positive,
        negative,
        latent["samples"],
        disable_pbar=True,
        seed=seed,
    )


# --- the anchor node against its oracles ---------------------------------------------------------


@pytest.mark.parametrize("steps,shift", [(1, 3.0), (4, 1.0), (8, 3.0), (9, 6.0), (30, 0.5)])
def test_anchor_node_equals_diffusers_scheduler_and_the_official_formula(comfy_host, steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    sigmas, plot = call_node(
        "LTAnchorScheduler", steps=steps, shift=shift, convention="diffusers", denoise=1.0
    )
    torch.testing.assert_close(sigmas, scheduler.sigmas.float(), atol=1e-6, rtol=0)
    assert_plot(plot)
    uniform = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    official = shift * uniform / (1 + (shift - 1) * uniform)  # Z-Image / Lumina time shift
    sigmas, _ = call_node("LTAnchorScheduler", steps=steps, shift=shift, convention="zimage", denoise=1.0)
    torch.testing.assert_close(sigmas, official.float(), atol=1e-6, rtol=0)


def test_anchor_node_gives_the_published_z_image_turbo_sigmas(comfy_host):
    sigmas, _ = call_node("LTAnchorScheduler", steps=8, shift=3.0, convention="zimage", denoise=1.0)
    torch.testing.assert_close(sigmas, torch.tensor(ZIMAGE_TURBO_8), atol=5e-5, rtol=0)


# --- stock lists ---------------------------------------------------------------------------------


def test_stock_lists_offer_our_names_once_even_after_a_reload(comfy_host):
    import comfy.samplers
    import nodes
    from comfy.k_diffusion import sampling as k_diffusion_sampling

    from lumina_turbo.patches.stock_lists import register_stock_names

    register_stock_names()
    register_stock_names()  # a reloaded pack must not duplicate names
    for names in (comfy.samplers.SCHEDULER_NAMES, comfy.samplers.KSampler.SCHEDULERS):
        assert [names.count(n) for n in OUR_SCHEDULERS] == [1, 1]
    for names in (
        comfy.samplers.KSAMPLER_NAMES,
        comfy.samplers.SAMPLER_NAMES,
        comfy.samplers.KSampler.SAMPLERS,
    ):
        assert names.count("flow_midpoint") == 1
    required = nodes.KSampler.INPUT_TYPES()["required"]
    assert "flow_midpoint" in required["sampler_name"][0]
    assert set(OUR_SCHEDULERS) <= set(required["scheduler"][0])
    assert comfy.samplers.ksampler("flow_midpoint").sampler_function.__name__ == "sample_flow_midpoint"
    assert k_diffusion_sampling.sample_flow_midpoint.__module__.endswith("samplers.flow_solvers")


def test_stock_handlers_take_the_shift_from_the_model_sampling(comfy_host):
    import comfy.model_sampling as ms
    import comfy.samplers

    lumina2, zimage = flow_model_sampling(6.0), flow_model_sampling(3.0)
    torch.testing.assert_close(
        comfy.samplers.calculate_sigmas(lumina2, "lt_sigmoid", 10), sigmoid_sigmas(10, shift=6.0)
    )
    torch.testing.assert_close(
        comfy.samplers.calculate_sigmas(zimage, "lt_anchor", 8),
        torch.tensor(ZIMAGE_TURBO_8),
        atol=5e-5,
        rtol=0,
    )

    class FluxSampling(ms.ModelSamplingFlux, ms.CONST):
        pass

    flux = FluxSampling()  # exponential shift: the model's own warp, value by value
    expected = torch.tensor([1.0] + [flux.percent_to_sigma(i / 4) for i in range(1, 4)] + [0.0])
    torch.testing.assert_close(comfy.samplers.calculate_sigmas(flux, "lt_anchor", 4), expected)

    class EpsSampling(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    with pytest.raises(ValueError, match="lt_sigmoid: this schedule is for flow-matching models"):
        comfy.samplers.calculate_sigmas(EpsSampling(), "lt_sigmoid", 10)


def test_a_name_another_pack_owns_is_left_alone(comfy_host):
    import comfy.samplers

    from lumina_turbo.patches.stock_lists import register_stock_names

    ours = comfy.samplers.SCHEDULER_HANDLERS["lt_anchor"]
    foreign = comfy.samplers.SchedulerHandler(lambda model_sampling, steps: torch.zeros(steps + 1))
    comfy.samplers.SCHEDULER_HANDLERS["lt_anchor"] = foreign
    try:
        register_stock_names()
        assert comfy.samplers.SCHEDULER_HANDLERS["lt_anchor"] is foreign
    finally:
        comfy.samplers.SCHEDULER_HANDLERS["lt_anchor"] = ours


# --- through the executor ------------------------------------------------------------------------


def test_sigmoid_midpoint_example_equals_the_pure_functions(comfy_host):
    prompt = json.loads((EXAMPLES / "sigmoid_midpoint_few_step.json").read_text())
    prompt["8"]["inputs"].update(width=64, height=64)  # the example as shipped, on a smaller latent
    outputs = comfy_host.run(with_saved_latent(prompt, "9", "sigmoid_midpoint"))
    assert len(outputs["11"]["images"]) == 1 and len(outputs["12"]["images"]) == 1  # picture + schedule plot
    got = comfy_host.latent(outputs)

    sched = prompt["5"]["inputs"]
    lumina2_shift = 6.0  # read by the node from the model; stated here independently
    sigmas = sigmoid_sigmas(sched["steps"], slope=sched["slope"], center=sched["center"], shift=lumina2_shift)

    def encode(clip):
        def text(node):
            return call_node(
                "CLIPTextEncodeLumina2",
                clip=clip,
                system_prompt=prompt[node]["inputs"]["system_prompt"],
                user_prompt=prompt[node]["inputs"]["user_prompt"],
            )[0]

        return text("2"), text("3")

    expected = reference_sample(
        prompt["1"]["inputs"],
        encode,
        prompt["4"]["inputs"]["cfg"],
        sigmas,
        prompt["7"]["inputs"]["noise_seed"],
        size=(64, 64),
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert float((got - expected).abs().max()) < float(got.abs().max()) * 1e-4


def test_stock_ksampler_flow_midpoint_lt_anchor_equals_the_pure_function_with_previews(
    comfy_host, monkeypatch
):
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args

    steps, cfg, seed = 3, 2.0, 7
    prompt = {
        "1": {
            "class_type": "LTModelLoader",
            "inputs": {
                "model": "tiny-random-lumina2",
                "text_encoder": "(from the diffusers folder)",
                "vae": "(from the diffusers folder)",
                "weight_dtype": "default",
            },
        },
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": seed,
                "steps": steps,
                "cfg": cfg,
                "sampler_name": "flow_midpoint",
                "scheduler": "lt_anchor",
                "denoise": 1.0,
            },
        },
    }
    progress = []
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    previous_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: progress.append((value, total, preview))
    )
    try:
        outputs = comfy_host.run(with_saved_latent(prompt, "5", "stock_midpoint"))
    finally:
        comfy.utils.set_progress_bar_global_hook(previous_hook)
    # One progress update with a latent preview per interval (the preview callback of flow_midpoint).
    assert [(value, total) for value, total, _ in progress] == [(i, steps) for i in range(1, steps + 1)]
    assert all(preview is not None and preview[1].size[0] > 0 for _, _, preview in progress)

    def encode(clip):
        return (
            call_node("CLIPTextEncode", clip=clip, text="a red cat")[0],
            call_node("CLIPTextEncode", clip=clip, text="blurry")[0],
        )

    loader_inputs = prompt["1"]["inputs"]
    lumina2_shift = 6.0  # the stock handler reads it from the model's model_sampling
    expected = reference_sample(
        loader_inputs, encode, cfg, anchor_sigmas(steps, lumina2_shift), seed, size=(64, 64)
    )
    torch.testing.assert_close(comfy_host.latent(outputs), expected, rtol=1e-5, atol=1e-6)


def test_zimage_turbo_anchor_example_runs_with_its_schedule_plot(comfy_host):
    prompt = json.loads((EXAMPLES / "zimage_turbo_anchor.json").read_text())
    prompt["7"]["inputs"].update(width=64, height=64)  # the example as shipped, on a smaller latent
    outputs = comfy_host.run(prompt)
    (image,) = comfy_host.image_paths({"10": outputs["10"]})
    assert image.is_file()
    (plot,) = outputs["11"]["images"]  # PreviewImage: the IMAGE output works without the frontend
    assert plot["type"] == "temp"


# --- bad input is refused before sampling --------------------------------------------------------


def _refusal(comfy_host, class_type, inputs):
    # Validation only (nothing runs): the example prompts give the node a real downstream output.
    example, node = {
        "LTAnchorScheduler": ("zimage_turbo_anchor", "4"),
        "LTSigmoidScheduler": ("sigmoid_midpoint_few_step", "5"),
        "LTFlowMidpointSampler": ("sigmoid_midpoint_few_step", "6"),
    }[class_type]
    prompt = json.loads((EXAMPLES / f"{example}.json").read_text())
    assert prompt[node]["class_type"] == class_type
    prompt[node]["inputs"].update(inputs)
    if class_type == "LTFlowMidpointSampler":
        del prompt["12"]  # the plot output does not need the sampler and would keep the prompt valid
    valid, _, _, node_errors = comfy_host.validate(prompt)
    assert not valid
    return json.dumps(node_errors[node]["errors"])


@pytest.mark.parametrize(
    "class_type,inputs,message",
    [
        (
            "LTAnchorScheduler",
            {"steps": 0, "shift": 3.0, "convention": "zimage", "denoise": 1.0},
            "steps must be between 1 and 10000",
        ),
        (
            "LTAnchorScheduler",
            {"steps": 8, "shift": 0.0, "convention": "zimage", "denoise": 1.0},
            "shift must be between 0.01 and 100",
        ),
        (
            "LTAnchorScheduler",
            {"steps": 8, "shift": 3.0, "convention": "sd3", "denoise": 1.0},
            "convention must be one of",
        ),
        (
            "LTSigmoidScheduler",
            {"steps": 0, "slope": 2.0, "center": 0.5, "denoise": 1.0},
            "steps must be between 1 and 10000",
        ),
        (
            "LTSigmoidScheduler",
            {"steps": 100, "slope": 20.0, "center": 1.0, "denoise": 1.0},
            "too steep for 100 steps",
        ),  # float32 sigmas would stop descending
        (
            "LTSigmoidScheduler",
            {"steps": 8, "slope": 2.0, "center": 1.5, "denoise": 1.0},
            "center must be between 0.0 and 1.0",
        ),
        (
            "LTSigmoidScheduler",
            {"steps": 8, "slope": -1.0, "center": 0.5, "denoise": 1.0},
            "slope must be between 0.0 and 20.0",
        ),
        ("LTFlowMidpointSampler", {"final_step": "heun"}, "final_step must be one of"),
    ],
)
def test_bad_input_is_refused_with_a_message_naming_it(comfy_host, class_type, inputs, message):
    assert message in _refusal(comfy_host, class_type, inputs)


def test_non_flow_model_is_a_clear_error_not_a_traceback(comfy_host):
    import comfy.model_sampling as ms

    from lumina_turbo.patches.sampling_shift import sigmas_for_model

    class EpsSampling(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    with pytest.raises(ValueError, match=r"model: .*flow-matching models.*ModelSamplingDiscrete \+ EPS"):
        sigmas_for_model(EpsSampling(), lambda shift: sigmoid_sigmas(4, shift=shift))


def test_linked_widget_inputs_are_checked_when_the_node_runs(comfy_host):
    prompt = {
        "1": {"class_type": "PrimitiveInt", "inputs": {"value": 0}},
        "2": {
            "class_type": "LTAnchorScheduler",
            "inputs": {"steps": ["1", 0], "shift": 3.0, "convention": "zimage", "denoise": 1.0},
        },
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}},
    }
    with pytest.raises(PromptFailed, match="steps must be a whole number >= 1"):
        comfy_host.run(prompt)


# --- the real server -----------------------------------------------------------------------------


@pytest.mark.server
def test_server_object_info_lists_our_names_in_the_stock_nodes(comfy_server):
    def options(spec):
        return spec[0] if isinstance(spec[0], list) else spec[1]["options"]

    ksampler = comfy_server.get_json("/object_info/KSampler")["KSampler"]["input"]["required"]
    assert "flow_midpoint" in options(ksampler["sampler_name"])
    assert set(OUR_SCHEDULERS) <= set(options(ksampler["scheduler"]))
    select = comfy_server.get_json("/object_info/KSamplerSelect")["KSamplerSelect"]["input"]["required"]
    assert options(select["sampler_name"]).count("flow_midpoint") == 1
    basic = comfy_server.get_json("/object_info/BasicScheduler")["BasicScheduler"]["input"]["required"]
    assert [options(basic["scheduler"]).count(n) for n in OUR_SCHEDULERS] == [1, 1]
    info = comfy_server.get_json("/object_info")
    for node_id, names in {
        "LTSigmoidScheduler": {"steps", "slope", "center", "denoise", "model"},
        "LTAnchorScheduler": {"steps", "shift", "convention", "denoise"},
        "LTFlowMidpointSampler": {"final_step"},
    }.items():
        inputs = info[node_id]["input"]
        assert names == set(inputs["required"]) | set(inputs.get("optional", {})), node_id
        assert info[node_id]["category"] == "LuminaTurbo/sampling" and info[node_id]["description"]
