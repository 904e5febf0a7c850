"""The building blocks of the tests' API prompts, on the tiny models (one place, not one per test file).

Each function adds nodes to a ComfyUI GraphBuilder (``harness.graph()``) and returns the node.
"""

from __future__ import annotations

FROM_FOLDER = "(from the diffusers folder)"
TEXT_ENCODER_FILES = {"lumina2": "tiny-random-gemma2.safetensors", "zimage": "tiny-random-qwen3.safetensors"}
VAE_FILE = "tiny-random-flux-vae.safetensors"


def tiny_loader(g, family: str = "zimage", source: str = "folder", weight_dtype: str = "default"):
    """LTModelLoader on a tiny model: its diffusers folder, or its single files."""
    if source == "folder":
        return g.node("LTModelLoader", model=f"tiny-random-{family}", text_encoder=FROM_FOLDER,
                      vae=FROM_FOLDER, weight_dtype=weight_dtype)  # fmt: skip
    return g.node("LTModelLoader", model=f"tiny-random-{family}.safetensors",
                  text_encoder=TEXT_ENCODER_FILES[family], vae=VAE_FILE, weight_dtype=weight_dtype)  # fmt: skip


def encode(g, family: str, clip, text: str):
    """The family's text node: CLIPTextEncodeLumina2 (system prompt 'superior') or CLIPTextEncode."""
    if family == "lumina2":
        return g.node("CLIPTextEncodeLumina2", system_prompt="superior", user_prompt=text, clip=clip)
    return g.node("CLIPTextEncode", text=text, clip=clip)


def empty_latent(g, width: int = 64, height: int = 48, batch_size: int = 1):
    return g.node("EmptySD3LatentImage", width=width, height=height, batch_size=batch_size)


def ksampler(g, model, positive, negative, latent, *, seed=1, steps=2, cfg=1.0, sampler="euler",
             scheduler="simple", denoise=1.0):  # fmt: skip
    """The stock KSampler; every input an output reference or a value."""
    return g.node("KSampler", model=model, positive=positive, negative=negative, latent_image=latent,
                  seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler,
                  denoise=denoise)  # fmt: skip


def fit_sampler(
    g, guider, latent, *, steps, solver, fit, calibration_samples, iterations, batch_size, seed=0, **optional
):
    """LTFitSampler on a GUIDER and a LATENT output reference (``optional``: e.g. samples_per_iteration)."""
    return g.node("LTFitSampler", guider=guider, latent=latent, steps=steps, solver=solver, fit=fit,
                  calibration_samples=calibration_samples, iterations=iterations, batch_size=batch_size,
                  seed=seed, **optional)  # fmt: skip


def save_latent(g, samples, prefix: str):
    return g.node("SaveLatent", samples=samples, filename_prefix=prefix)


def decode_and_save(g, samples, vae, prefix: str):
    image = g.node("VAEDecode", samples=samples, vae=vae)
    return g.node("SaveImage", images=image.out(0), filename_prefix=prefix)


def trainer_inputs(**changes) -> dict:
    """Every LTLoraTrainer widget: the option defaults, a short fp32 run for the tiny models, then ``changes``."""
    from ..training import options

    inputs = {
        options.widget_name(n): options.fields()[n].default for n in options.node_options(options.TRAINER)
    }
    inputs.update(
        steps=3, learning_rate=5e-3, rank=4, alpha=4.0, batch_size=2, seed=1, turbo_steps=8,
        mixed_precision="fp32", gradient_checkpointing=False, checkpoint_every=2, resume=True, advanced="",
    )  # fmt: skip
    inputs.update(changes)
    return inputs
