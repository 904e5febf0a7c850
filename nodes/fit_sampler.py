"""LTFitSampler: fits few-step sigmas (and a bespoke solver) to a GUIDER; SAMPLER + SIGMAS + plot IMAGE.

Node glue only: the fit is samplers/fitting.py. The denoiser it fits to is the guider itself,
run through ComfyUI's own sampling (``guider.sample`` with a SAMPLER whose function performs the fit),
so the model is loaded by ComfyUI's model management and every wrapper, patch and cfg setting of the
guider applies exactly as when sampling. Gradients flow through the model to its input on a clone of
the MODEL (its weights stay frozen). Fits are cached as small JSON files under the output folder,
``lumina_turbo/fits/<hash>.json``, keyed by the weights' identity, the guider's settings and
conditioning, the model's default schedule (its shift) and every fit input; a re-run reads the file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..samplers.fitted_sampler import (
    CALLS_PER_INTERVAL,
    FIT_KINDS,
    FORMAT_VERSION,
    SOLVERS,
    FittedSampler,
    sample_fitted,
)
from ..samplers.fitting import fit_sampler
from .input_checks import checked_execution, checked_validation
from .sigma_plot import sigma_plot

log = logging.getLogger("lumina_turbo")
CACHE_SUBFOLDER = ("lumina_turbo", "fits")
LIMITS = {
    "steps": (1, 50),
    "calibration_samples": (4, 1024),
    "iterations": (0, 1000),
    "batch_size": (1, 1024),
    "seed": (0, 2**32 - 1),
    "samples_per_iteration": (0, 1024),
    "restarts": (1, 4),
    "settle_iterations": (0, 1000),
}


def _describe(value, depth: int = 0):
    """A JSON-able, address-free description of conditioning / model options for the cache key."""
    from ..training.cache import tensor_sample_bytes

    if depth > 8:
        return type(value).__name__
    if isinstance(value, torch.Tensor):
        sample = hashlib.sha256(tensor_sample_bytes(value)).hexdigest()[:16]
        return ["tensor", list(value.shape), str(value.dtype), sample]
    if isinstance(value, dict):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_describe(v, depth + 1) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    settings = getattr(value, "settings", None)
    if settings is not None:  # the pack's guidance wrappers carry their options here
        return [type(value).__qualname__, repr(settings)]
    return type(value).__qualname__


def fit_key(guider, noise_shape, start_sigmas, options: dict) -> str:
    """Hash of what decides a fit: weights (+ LoRA patches), guider, conditioning, schedule, inputs."""
    from ..training.model_patch import model_fingerprint

    parts = {
        "format": FORMAT_VERSION,
        "model": model_fingerprint(guider.model_patcher),
        "guider": type(guider).__qualname__,
        "cfg": getattr(guider, "cfg", None),
        "conds": _describe(getattr(guider, "original_conds", {})),
        "model_options": _describe(guider.model_options),
        "start_sigmas": [round(float(v), 7) for v in start_sigmas],
        "noise_shape": list(noise_shape),
        **options,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_path(key: str) -> Path:
    """Where a fit lives: always inside ComfyUI's output folder, named by its hash only."""
    return Path(folder_paths.get_output_directory(), *CACHE_SUBFOLDER, f"{key}.json")


def _read_cache(path: Path) -> FittedSampler | None:
    if not path.is_file():
        return None
    try:
        return FittedSampler.from_json(path.read_text())
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        log.warning("lumina_turbo: ignoring unreadable fit cache %s (%s); fitting again", path.name, err)
        return None


def _write_cache(path: Path, fitted: FittedSampler) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".fit-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(fitted.to_json())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def differentiable_clone(model):
    """A clone of a MODEL through which autograd reaches the input: weights frozen, activations of
    the transformer blocks recomputed in backward (memory), inference-mode weights copied per use."""
    from ..training.model_patch import CheckpointedForward, has_inference_weights, writable_weight

    patcher = model.clone()
    diffusion_model = patcher.model.diffusion_model
    for prefix in ("layers", "noise_refiner", "context_refiner"):
        for index, block in enumerate(getattr(diffusion_model, prefix, None) or []):
            patcher.add_object_patch(f"diffusion_model.{prefix}.{index}.forward", CheckpointedForward(block))
    if has_inference_weights(diffusion_model):
        for name, module in diffusion_model.named_modules():
            if hasattr(module, "comfy_cast_weights") and getattr(module, "weight", None) is not None:
                patcher.add_weight_wrapper(f"diffusion_model.{name}.weight", writable_weight)
    return patcher


def fit_with_guider(
    guider,
    noise,
    start_sigmas,
    steps,
    solver,
    fit,
    iterations,
    batch_size,
    seed,
    samples_per_iteration=0,
    restarts=1,
    settle_iterations=0,
) -> FittedSampler:
    """Run :func:`fit_sampler` with the guider as the denoiser, inside ComfyUI's sampling machinery."""
    progress = comfy.utils.ProgressBar(max((iterations + settle_iterations) * restarts, 1))
    result = {}

    def fit_function(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args
        with torch.inference_mode(False), torch.enable_grad():
            calibration = x.detach().clone()  # a normal tensor: autograd cannot save inference tensors

            def denoise(state, sigma):
                return model(state, sigma, **extra_args)

            result["fitted"] = fit_sampler(
                denoise,
                calibration,
                steps,
                solver=solver,
                fit=fit,
                start_sigmas=start_sigmas,
                seed=seed,
                iterations=iterations,
                chunk=batch_size,
                samples_per_iteration=samples_per_iteration or None,
                restarts=restarts,
                settle_iterations=settle_iterations,
                progress=lambda done, total: progress.update_absolute(done, total),
            )
        return x

    fitting_guider = copy.copy(guider)
    fitting_guider.model_patcher = differentiable_clone(guider.model_patcher)
    fitting_guider.sample(
        noise,
        torch.zeros_like(noise),
        comfy.samplers.KSAMPLER(fit_function),
        start_sigmas.to(torch.float32),
        disable_pbar=True,
        seed=seed,
    )
    return result["fitted"]


def default_sigmas(model_sampling, steps: int) -> torch.Tensor:
    """The model's own schedule (ComfyUI ``simple`` at its shift), the fit's start and the plot's grey line."""
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "simple", steps).to(torch.float64)
    sigmas[0] = 1.0  # the flow's sigma_max, up to float rounding of the shifted table
    return sigmas


class LTFitSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTFitSampler",
            display_name="Fit Few-Step Sampler",
            category="LuminaTurbo/sampling",
            description=(
                "Fits the sigmas (and, for fit = bespoke, per-step corrections of the solver) of a few-step "
                "sampler to the model and guidance you will really sample with: the error of the terminal "
                "latent against a fine-step solution from the same calibration noise is minimised, and the "
                "iterate best on held-back calibration noise is kept. Connect SAMPLER and SIGMAS to "
                "SamplerCustomAdvanced (with the same GUIDER). Fitting costs about calibration_samples x (128 + "
                "3 x iterations x model calls) model evaluations (fewer with samples_per_iteration); the result "
                "is cached on disk, so a re-run of the workflow costs nothing. For flow-matching models (Lumina, "
                "Z-Image, Flux, SD3...)."
            ),
            inputs=[
                io.Guider.Input(
                    "guider",
                    tooltip="What will be sampled: model + conditioning + cfg (LTCFGGuider, CFGGuider, ...).",
                ),
                io.Latent.Input(
                    "latent",
                    tooltip="Gives the size of the calibration noise (its batch is ignored: see "
                    "calibration_samples). Use the latent you will sample.",
                ),
                io.Int.Input(
                    "steps",
                    default=8,
                    min=LIMITS["steps"][0],
                    max=LIMITS["steps"][1],
                    tooltip="Sampling intervals (SIGMAS = steps + 1). Model calls per image: steps for euler and "
                    "the multistep solvers, 2 x steps for midpoint.",
                ),
                io.Combo.Input(
                    "solver",
                    options=list(SOLVERS),
                    default="multistep3",
                    tooltip="Base solver, 1 call per step unless said. multistep3: 3rd order (the last three "
                    "predictions; default). multistep: 2nd order. euler: 1st order. midpoint: 2nd order, 2 calls "
                    "per step.",
                ),
                io.Combo.Input(
                    "fit",
                    options=list(FIT_KINDS),
                    default="bespoke",
                    tooltip="steps: fit only the sigmas (usable with any solver of the same kind). bespoke: "
                    "also per-step corrections of the solver (only with these SIGMAS); lower error.",
                ),
                io.Int.Input(
                    "calibration_samples",
                    default=32,
                    min=LIMITS["calibration_samples"][0],
                    max=LIMITS["calibration_samples"][1],
                    tooltip="Noise samples the fit sees (a quarter is held back to choose the best iterate). "
                    "More: less overfitting, proportionally more time.",
                ),
                io.Int.Input(
                    "iterations",
                    default=150,
                    min=LIMITS["iterations"][0],
                    max=LIMITS["iterations"][1],
                    tooltip="Optimiser iterations; each runs the sampler forward and backward on the "
                    "calibration noise. 0 = no fit (the model's default schedule).",
                ),
                io.Int.Input(
                    "batch_size",
                    default=8,
                    min=LIMITS["batch_size"][0],
                    max=LIMITS["batch_size"][1],
                    tooltip="Calibration samples per model call (memory: the backward pass keeps one batch's "
                    "activations of every step).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=LIMITS["seed"][0],
                    max=LIMITS["seed"][1],
                    tooltip="Seed of the calibration noise and of the held-back split.",
                ),
                io.Int.Input(
                    "samples_per_iteration",
                    default=0,
                    min=LIMITS["samples_per_iteration"][0],
                    max=LIMITS["samples_per_iteration"][1],
                    optional=True,
                    tooltip="Calibration samples of each iteration's gradient, drawn afresh (0 = all). Lets a "
                    "larger calibration set (less overfitting; its reference costs 128 calls per sample once) "
                    "cost little more per iteration.",
                ),
                io.Int.Input(
                    "restarts",
                    default=1,
                    min=LIMITS["restarts"][0],
                    max=LIMITS["restarts"][1],
                    optional=True,
                    tooltip="Whole fits (seeds seed, seed + 1, ...) of which the one with the lowest error on "
                    "all the calibration noise is kept; each costs a full fit (the reference is shared). Pays on "
                    "models whose fits land far apart from seed to seed.",
                ),
                io.Int.Input(
                    "settle_iterations",
                    default=0,
                    min=LIMITS["settle_iterations"][0],
                    max=LIMITS["settle_iterations"][1],
                    optional=True,
                    tooltip="More iterations after the others at their final, small learning rate; the fit "
                    "can only end better on the held-back noise. The other remedy for models whose fits land "
                    "far apart from seed to seed; each costs about one iteration.",
                ),
            ],
            outputs=[
                io.Sampler.Output(display_name="sampler"),
                io.Sigmas.Output(display_name="sigmas"),
                io.Image.Output(
                    display_name="plot",
                    tooltip="The fitted sigmas (blue) against the model's default schedule (grey).",
                ),
            ],
        )

    @classmethod
    @checked_validation
    def validate_inputs(cls):
        return True  # the schema check (types, finiteness, ranges, combos) is all this node needs

    @classmethod
    @checked_execution
    def execute(
        cls,
        guider,
        latent,
        steps,
        solver,
        fit,
        calibration_samples,
        iterations,
        batch_size,
        seed,
        samples_per_iteration=0,
        restarts=1,
        settle_iterations=0,
    ) -> io.NodeOutput:
        import comfy.model_sampling

        model_sampling = guider.model_patcher.get_model_object("model_sampling")
        if not isinstance(model_sampling, comfy.model_sampling.CONST):
            raise ValueError(
                f"guider: the model samples with {type(model_sampling).__name__}, not a flow-matching (CONST) "
                "model; LTFitSampler fits flow models such as Lumina-Image-2.0, Z-Image, Flux or SD3"
            )
        samples = latent["samples"]
        if samples.is_nested:
            raise ValueError("latent: nested (multi-part) latents are not supported by LTFitSampler")
        shape = (calibration_samples, *samples.shape[1:])
        start = default_sigmas(model_sampling, steps)
        options = dict(
            steps=steps, solver=solver, fit=fit, iterations=iterations, batch_size=batch_size, seed=seed
        )
        if samples_per_iteration:  # absent when 0, so fits cached before the option existed still hit
            options["samples_per_iteration"] = samples_per_iteration
        if restarts > 1:  # likewise
            options["restarts"] = restarts
        if settle_iterations:  # likewise
            options["settle_iterations"] = settle_iterations
        path = cache_path(fit_key(guider, shape, start, options))
        fitted = _read_cache(path)
        if fitted is None:
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)
            fitted = fit_with_guider(
                guider,
                noise,
                start,
                steps,
                solver,
                fit,
                iterations,
                batch_size,
                seed,
                samples_per_iteration,
                restarts,
                settle_iterations,
            )
            _write_cache(path, fitted)
            log.info("lumina_turbo: LTFitSampler fitted %s (%s)", path.name, fitted.report)
        sampler = comfy.samplers.KSAMPLER(sample_fitted, extra_options={"fitted": fitted.to_dict()})
        sigmas = fitted.sigmas.to(torch.float32)
        report = fitted.report
        calls = CALLS_PER_INTERVAL[solver] * steps
        title = (
            f"LTFitSampler · {solver} {fit} · {calls} calls · error "
            f"{report.get('validation_error', float('nan')):.4f} (start {report.get('start_validation_error', float('nan')):.4f})"
        )
        if len(report.get("restart_errors", ())) > 1:  # how far apart the fits landed
            title += f" · restarts {min(report['restart_errors']):.4f}-{max(report['restart_errors']):.4f}"
        plot = sigma_plot(
            sigmas, title, reference=start.to(torch.float32), labels=("fitted", "model default")
        )
        return io.NodeOutput(sampler, sigmas, plot)


NODES = [LTFitSampler]
