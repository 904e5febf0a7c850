"""LTDataset, LTLoraTrainer, LTSaveLora: node glue around training/ (no training logic here)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..losses import LOSS_MODES, TIMESTEP_METHODS
from ..training import config as cfg
from ..training import data_files, optim
from ..training.dataset import build_dataset
from ..training.engine import LoraTrainer
from ..training.save import SAVE_FORMATS, save_lora_file
from . import paths
from .input_checks import checked_execution, checked_validation

DATASET = io.Custom("LT_DATASET")
LORA_MODEL = io.Custom("LORA_MODEL")
LOSS_MAP = io.Custom("LOSS_MAP")
PROGRESS_EVENT = "lumina_turbo.train_progress"
CACHE_FOLDER = "lumina_turbo_cache"
RUNS_FOLDER = "lumina_turbo_training"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _input_dir() -> str:
    return folder_paths.get_input_directory()


def _dataset_root(folder) -> Path:
    # the path policy first: nothing outside input/ (or an allowed root) is looked at
    return data_files.resolve_folder(str(paths.dataset_folder(folder)), _input_dir())


def _scan(folder: str, num_repeats: int = 1):
    records = data_files.scan_folder(_dataset_root(folder), num_repeats=num_repeats)
    paths.check_files_inside([r.path for r in records], "folder")
    return records


def _cache_root(cache_dir) -> Path:
    if not (cache_dir or "").strip():
        return paths.output_subfolder(CACHE_FOLDER, input_name="cache_dir")
    return paths.cache_folder(cache_dir)


def _check_run_name(run_name) -> None:
    if not isinstance(run_name, str) or not _RUN_NAME.match(run_name):
        raise paths.PathRefused(
            f"run_name: {run_name!r} must be 1-100 letters, digits, '.', '_' or '-' (it names a folder)"
        )


def _choice_error(values: dict, choices: dict) -> str | None:
    for name, options in choices.items():
        if name in values and values[name] not in options:
            return f"{name}: {values[name]!r} is not one of {list(options)}"
    return None


class LTDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTDataset",
            display_name="LT Training Dataset (cached)",
            category="LuminaTurbo/training",
            description=(
                "A folder of images with same-name .txt captions (kohya 'N_name' sub-folders repeat N times), "
                "encoded once by the VAE and the text encoder and cached on disk (ComfyUI output/"
                f"{CACHE_FOLDER}/, keyed by image content, model and bucket size): later runs reuse the cache "
                "and only encode what changed. Images go to aspect-ratio buckets; batches stay within a bucket."
            ),
            inputs=[
                io.String.Input(
                    "folder",
                    default="",
                    tooltip="Folder under ComfyUI's input/ folder (e.g. 'my_concept'); elsewhere only where "
                    "the server allows it (LUMINA_TURBO_TRAINING_ROOTS). Every image needs a .txt caption "
                    "with the same name.",
                ),
                io.Vae.Input("vae", tooltip="The VAE of the model you will train (encodes the images once)."),
                io.Clip.Input(
                    "clip",
                    tooltip="The text encoder of the model you will train (encodes each caption once).",
                ),
                io.Int.Input(
                    "resolution",
                    default=1024,
                    min=64,
                    max=8192,
                    step=16,
                    tooltip="Training resolution: each bucket holds about resolution x resolution pixels.",
                ),
                io.Int.Input(
                    "bucket_step",
                    default=64,
                    min=16,
                    max=1024,
                    step=16,
                    tooltip="Bucket sides are multiples of this many pixels.",
                ),
                io.Boolean.Input(
                    "enable_bucket",
                    default=True,
                    tooltip="Aspect-ratio buckets; off = every image is centre-cropped to a square.",
                ),
                io.Float.Input(
                    "caption_dropout",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Probability of training a sample with the empty caption (helps CFG-free use).",
                ),
                io.Combo.Input(
                    "system_prompt",
                    options=list(cfg.SYSTEM_PROMPTS),
                    default="none",
                    tooltip="Lumina-2 only: prepend the system prompt CLIPTextEncodeLumina2 uses; pick the "
                    "one you will sample with. Z-Image: none.",
                ),
                io.Int.Input(
                    "num_repeats",
                    default=1,
                    min=1,
                    max=10000,
                    tooltip="Repeats of images placed directly in the folder (N_name sub-folders use N).",
                ),
                io.Int.Input(
                    "max_sequence_length",
                    default=512,
                    min=1,
                    max=8192,
                    tooltip="Text tokens kept per caption (longer captions are cut).",
                ),
                io.String.Input(
                    "cache_dir",
                    default="",
                    optional=True,
                    tooltip=f"Cache folder under ComfyUI's output/ (or an allowed training root); empty = "
                    f"output/{CACHE_FOLDER}/. Safe to delete any time.",
                ),
            ],
            outputs=[
                DATASET.Output(
                    display_name="dataset", tooltip="References to the cached latents and captions."
                )
            ],
        )

    @classmethod
    @checked_validation
    def validate_inputs(cls, folder, system_prompt, cache_dir=None):
        error = _choice_error({"system_prompt": system_prompt}, {"system_prompt": cfg.SYSTEM_PROMPTS})
        if error:
            return error
        try:
            if folder is not None:  # linked: checked in execute
                _scan(folder)
            if cache_dir is not None:
                _cache_root(cache_dir)
        except ValueError as exc:  # DatasetError, PathRefused
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, num_repeats=1, **kwargs):
        # Re-run when images or captions change, even though the widget values did not.
        try:
            return data_files.folder_fingerprint(_scan(folder, num_repeats))
        except ValueError as exc:  # DatasetError, PathRefused: execute reports it
            return str(exc)

    @classmethod
    @checked_execution
    def execute(
        cls,
        folder,
        vae,
        clip,
        resolution,
        bucket_step,
        enable_bucket,
        caption_dropout,
        system_prompt,
        num_repeats,
        max_sequence_length,
        cache_dir="",
    ) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        records = _scan(folder, num_repeats)
        cache_root = _cache_root(cache_dir)
        bar = None

        def progress(done, total):
            nonlocal bar
            bar = bar or comfy.utils.ProgressBar(total)
            bar.update_absolute(done, total)
            comfy.model_management.throw_exception_if_processing_interrupted()

        dataset = build_dataset(
            records,
            vae=vae,
            clip=clip,
            cache_root=cache_root,
            resolution=resolution,
            bucket_step=bucket_step,
            enable_bucket=enable_bucket,
            caption_dropout_rate=caption_dropout,
            max_sequence_length=max_sequence_length,
            system_prompt=system_prompt,
            progress=progress,
        )
        s = dataset.stats
        buckets = sorted({item.size for item in dataset.items})
        text = (
            f"{s['images']} images, {dataset.num_samples} samples per epoch, buckets {buckets}; latents: "
            f"{s['latents_encoded']} encoded, {s['latents_cached']} from cache; captions: {s['texts_encoded']} "
            f"encoded, {s['texts_cached']} from cache ({cache_root})"
        )
        return io.NodeOutput(dataset, ui=ui.PreviewText(text))


# Node widgets -> TrainConfig fields (the advanced box may set every other field).
WIDGETS = {
    "steps": "max_train_steps",
    "learning_rate": "learning_rate",
    "rank": "network_dim",
    "alpha": "network_alpha",
    "batch_size": "batch_size",
    "gradient_accumulation": "gradient_accumulation_steps",
    "seed": "seed",
    "timestep_method": "timestep_method",
    "turbo_steps": "turbo_steps",
    "shift": "shift",
    "jitter_scale": "jitter_scale",
    "loss_mode": "loss_mode",
    "snr_gamma": "snr_gamma",
    "replay_ratio": "replay_ratio",
    "curvature_weight": "curvature_weight",
    "train_refiners": "train_refiners",
    "train_adaln": "train_adaln",
    "optimizer": "optimizer_type",
    "lr_scheduler": "lr_scheduler",
    "warmup_steps": "lr_warmup_steps",
    "mixed_precision": "mixed_precision",
    "gradient_checkpointing": "gradient_checkpointing",
    "blocks_to_swap": "blocks_to_swap",
    "checkpoint_every": "save_every_n_steps",
    "resume": "resume",
}
COMBOS = {
    "timestep_method": TIMESTEP_METHODS,
    "loss_mode": tuple(LOSS_MODES),
    "optimizer": cfg.OPTIMIZERS,
    "lr_scheduler": cfg.LR_SCHEDULERS,
    "mixed_precision": cfg.PRECISIONS,
}
DATASET_FIELDS = {
    "folder",
    "sources",
    "enable_bucket",
    "resolution",
    "bucket_step",
    "max_aspect_ratio",
    "caption_dropout_rate",
    "max_sequence_length",
    "num_repeats",
    "caption_extension",
    "cache_dir",
    "system_prompt",
    "transformer",
    "text_encoder",
    "vae",
    "weight_dtype",
    "output_dir",
    "output_name",
    "save_dtype",
    "checkpoint_dir",
    "num_train_epochs",
}


def trainer_config(widgets: dict, advanced: str) -> cfg.TrainConfig:
    """Widget values + the advanced TOML box -> a validated TrainConfig (errors name the input)."""
    flat = {WIDGETS[name]: value for name, value in widgets.items()}
    base = cfg.config_from_flat(flat, origin="LTLoraTrainer")
    return cfg.parse_advanced(
        advanced, base, reserved=set(WIDGETS.values()) | DATASET_FIELDS, origin="advanced"
    )


class LTLoraTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = cfg.TrainConfig()
        return io.Schema(
            node_id="LTLoraTrainer",
            display_name="LT AC-RF LoRA Trainer",
            category="LuminaTurbo/training",
            description=(
                "Trains a LoRA on Lumina-2 / Z-Image with AC-RF anchor timesteps (the Turbo schedule), the seed's "
                "loss modes in velocity space, Min-SNR, replay and curvature options. Each latent trains against "
                "its own caption. Checkpoints every N steps and on interrupt to ComfyUI output/"
                f"{RUNS_FOLDER}/<run_name>/; queue it again to resume exactly. Live loss: the "
                f"'{PROGRESS_EVENT}' event."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The Lumina-2 / Z-Image model to train on (its loaded LoRAs stay merged).",
                ),
                DATASET.Input("dataset", tooltip="From LTDataset."),
                io.Int.Input(
                    "steps", default=d.max_train_steps, min=1, max=1_000_000, tooltip="Optimizer steps."
                ),
                io.Float.Input(
                    "learning_rate",
                    default=d.learning_rate,
                    min=1e-7,
                    max=1.0,
                    step=1e-6,
                    tooltip="Peak learning rate.",
                ),
                io.Int.Input("rank", default=d.network_dim, min=1, max=1024, tooltip="LoRA rank."),
                io.Float.Input(
                    "alpha",
                    default=d.network_alpha,
                    min=0.001,
                    max=4096.0,
                    step=0.5,
                    tooltip="LoRA alpha; the update is scaled by alpha / rank.",
                ),
                io.Int.Input(
                    "batch_size",
                    default=d.batch_size,
                    min=1,
                    max=256,
                    tooltip="Samples per micro-batch, drawn within one bucket.",
                ),
                io.Int.Input(
                    "gradient_accumulation",
                    default=d.gradient_accumulation_steps,
                    min=1,
                    max=1024,
                    tooltip="Micro-batches per optimizer step.",
                ),
                io.Int.Input(
                    "seed",
                    default=d.seed,
                    min=0,
                    max=2**63 - 1,
                    tooltip="Seeds LoRA init, data order, sigmas and noise (exact resume relies on it).",
                ),
                io.Combo.Input(
                    "timestep_method",
                    options=list(TIMESTEP_METHODS),
                    default=d.timestep_method,
                    tooltip="anchor: AC-RF anchors of the Turbo schedule (+ jitter); uniform / "
                    "shifted_sigmoid: for non-Turbo training.",
                ),
                io.Int.Input(
                    "turbo_steps",
                    default=d.turbo_steps,
                    min=1,
                    max=1000,
                    tooltip="Number of anchors = the step count you will sample with.",
                ),
                io.Float.Input(
                    "shift",
                    default=d.shift,
                    min=0.01,
                    max=100.0,
                    step=0.01,
                    tooltip="Static time shift of the anchors (Z-Image-Turbo: 3.0).",
                ),
                io.Float.Input(
                    "jitter_scale",
                    default=d.jitter_scale,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Gaussian jitter added to each anchor sigma.",
                ),
                io.Combo.Input(
                    "loss_mode",
                    options=list(LOSS_MODES),
                    default=d.loss_mode,
                    tooltip="standard (MSE + optional L1/cosine), frequency, style, unified; "
                    "parameters in 'advanced'.",
                ),
                io.Float.Input(
                    "snr_gamma",
                    default=d.snr_gamma,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip="Min-SNR gamma, rectified-flow form (0 = off); form and floor in 'advanced'.",
                ),
                io.Float.Input(
                    "replay_ratio",
                    default=d.replay_ratio,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="Replays per batch sample: the hardest recent samples (by unweighted loss) are "
                    "trained again on top of each batch (0 = off).",
                ),
                io.Float.Input(
                    "curvature_weight",
                    default=d.curvature_weight,
                    min=0.0,
                    max=100.0,
                    step=0.01,
                    tooltip="Weight of the trajectory-curvature penalty (2 extra forward passes; 0 = off).",
                ),
                io.Boolean.Input(
                    "train_refiners",
                    default=d.train_refiners,
                    tooltip="Also put LoRAs on the noise/context refiner blocks.",
                ),
                io.Boolean.Input(
                    "train_adaln", default=d.train_adaln, tooltip="Also train the adaLN modulation layers."
                ),
                io.Combo.Input(
                    "optimizer",
                    options=list(cfg.OPTIMIZERS),
                    default=d.optimizer_type,
                    tooltip="AdamW; AdamW8bit needs bitsandbytes on CUDA; Prodigy needs prodigyopt.",
                ),
                io.Combo.Input(
                    "lr_scheduler",
                    options=list(cfg.LR_SCHEDULERS),
                    default=d.lr_scheduler,
                    tooltip="Learning-rate schedule after the warmup.",
                ),
                io.Int.Input(
                    "warmup_steps",
                    default=d.lr_warmup_steps,
                    min=0,
                    max=1_000_000,
                    tooltip="Linear learning-rate warmup steps.",
                ),
                io.Combo.Input(
                    "mixed_precision",
                    options=list(cfg.PRECISIONS),
                    default=d.mixed_precision,
                    tooltip="Model compute dtype; the LoRA itself is always float32.",
                ),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=d.gradient_checkpointing,
                    tooltip="Recompute block activations in backward (less memory, ~30% slower).",
                ),
                io.Int.Input(
                    "blocks_to_swap",
                    default=d.blocks_to_swap,
                    min=0,
                    max=1000,
                    tooltip="Keep the last N main blocks in RAM: the model is loaded without them and "
                    "ComfyUI's low-VRAM casting streams them to the GPU layer by layer (larger models fit, "
                    "slower). Needs gradient_checkpointing.",
                ),
                io.String.Input(
                    "run_name",
                    default="lora_run",
                    tooltip=f"Checkpoint folder name under output/{RUNS_FOLDER}/ (letters, digits, . _ -).",
                ),
                io.Int.Input(
                    "checkpoint_every",
                    default=d.save_every_n_steps,
                    min=0,
                    max=1_000_000,
                    tooltip="Write a checkpoint every N steps (also on interrupt and at the end).",
                ),
                io.Boolean.Input(
                    "resume",
                    default=d.resume,
                    tooltip="Continue from this run's checkpoint when one exists (same settings required).",
                ),
                io.String.Input(
                    "advanced",
                    default="",
                    multiline=True,
                    optional=True,
                    tooltip="More settings as TOML 'key = value' lines with the config file's names, "
                    "e.g. lambda_l1 = 0.5, snr_floor = 0.1, weight_decay = 0.0.",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained LoRA applied."),
                LORA_MODEL.Output(
                    display_name="lora", tooltip="The LoRA (ComfyUI-native keys) for LTSaveLora."
                ),
                LOSS_MAP.Output(display_name="loss_map", tooltip="{'loss': [...]} per optimizer step."),
                io.Int.Output(display_name="steps", tooltip="Optimizer steps trained in total."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    @checked_validation
    def validate_inputs(
        cls,
        run_name,
        timestep_method,
        loss_mode,
        optimizer,
        lr_scheduler,
        mixed_precision,
        gradient_checkpointing,
        blocks_to_swap,
        advanced="",
    ):
        values = {
            "timestep_method": timestep_method,
            "loss_mode": loss_mode,
            "optimizer": optimizer,
            "lr_scheduler": lr_scheduler,
            "mixed_precision": mixed_precision,
        }
        error = _choice_error(values, COMBOS) or optim.missing_package(optimizer)
        if error:
            return error
        try:
            if run_name is not None:  # linked: checked in execute
                _check_run_name(run_name)
            widgets = cfg.TrainConfig(
                gradient_checkpointing=gradient_checkpointing, blocks_to_swap=blocks_to_swap
            )
            cfg.parse_advanced(
                advanced or "",
                cfg.validate(widgets, "LTLoraTrainer"),
                reserved=set(WIDGETS.values()) | DATASET_FIELDS,
            )
        except (cfg.ConfigError, paths.PathRefused) as exc:
            return str(exc)
        return True

    @classmethod
    @checked_execution
    def execute(cls, model, dataset, run_name, advanced="", **widgets) -> io.NodeOutput:
        import comfy.model_management
        import comfy.sd
        import comfy.utils

        _check_run_name(run_name)
        run_dir = paths.output_subfolder(RUNS_FOLDER, run_name, input_name="run_name")
        config = trainer_config(widgets, advanced or "")
        node_id = cls.hidden.unique_id
        bar = comfy.utils.ProgressBar(config.max_train_steps)

        def on_step(step, total, loss, lr):
            _send_progress({"node": node_id, "step": step, "total": total, "loss": loss, "lr": lr})
            bar.update_absolute(step, total)

        with torch.inference_mode(False):
            trainer = LoraTrainer(
                config,
                model,
                dataset,
                run_dir=run_dir,
                on_step=on_step,
                check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
            )
            result = trainer.run()
        trained, _ = comfy.sd.load_lora_for_models(model, None, result.lora, 1.0, 0)
        text = (
            (
                f"{result.steps} steps (resumed at {result.resumed_from}), final loss "
                f"{result.loss_history[-1]:.5g}; checkpoint {result.checkpoint}"
            )
            if result.loss_history
            else ""
        )
        return io.NodeOutput(
            trained, result.lora, {"loss": list(result.loss_history)}, result.steps, ui=ui.PreviewText(text)
        )


def _send_progress(payload: dict) -> None:
    """The live-loss event for the UI chart, plus the loss as the node's progress text."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return
    instance.send_sync(PROGRESS_EVENT, payload)
    send_text = getattr(instance, "send_progress_text", None)
    if send_text is not None and payload.get("node") is not None:
        send_text(
            f"step {payload['step']}/{payload['total']}  loss {payload['loss']:.4f}  lr {payload['lr']:.2e}",
            payload["node"],
        )


class LTSaveLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LTSaveLora",
            display_name="LT Save LoRA",
            category="LuminaTurbo/training",
            description=(
                "Writes a LoRA to ComfyUI's models/loras/ (so LoraLoader lists it) with its training metadata, "
                "atomically. 'comfyui' keys (diffusion_model.layers.N.attention.qkv.lora_up.weight, alpha) load "
                "in the stock LoraLoader with no warning; 'kohya' (lora_unet_...) is the same LoRA under kohya names; "
                "'diffusers' is the PEFT layout diffusers' load_lora_weights reads (split to_q/to_k/to_v)."
            ),
            is_output_node=True,
            inputs=[
                LORA_MODEL.Input("lora", tooltip="From LTLoraTrainer (or ComfyUI's TrainLoraNode)."),
                io.String.Input(
                    "filename_prefix",
                    default="lumina_turbo/lora",
                    tooltip="File name under models/loras/; a counter and .safetensors are appended.",
                ),
                io.Combo.Input(
                    "save_dtype",
                    options=["bf16", "fp16", "fp32"],
                    default="bf16",
                    tooltip="Tensor dtype in the file (fp32 reproduces the trained model exactly).",
                ),
                io.Combo.Input(
                    "format",
                    options=list(SAVE_FORMATS),
                    default="comfyui",
                    tooltip="Key layout: comfyui (native), kohya (lora_unet_...) or diffusers (PEFT "
                    "transformer.<diffusers name>.lora_A/lora_B, q/k/v split, alpha folded in).",
                ),
            ],
            outputs=[],
        )

    @classmethod
    @checked_validation
    def validate_inputs(cls, filename_prefix, save_dtype, format):  # noqa: A002 - the input's name
        error = _choice_error(
            {"save_dtype": save_dtype, "format": format},
            {"save_dtype": ("bf16", "fp16", "fp32"), "format": SAVE_FORMATS},
        )
        if error:
            return error
        if filename_prefix is not None:  # linked: checked in execute
            return _prefix_error(filename_prefix) or True
        return True

    @classmethod
    @checked_execution
    def execute(cls, lora, filename_prefix, save_dtype, format) -> io.NodeOutput:  # noqa: A002
        error = _prefix_error(filename_prefix)
        if error:
            raise paths.PathRefused(error)
        loras_dir = folder_paths.get_folder_paths("loras")[0]
        path = save_lora_file(lora, loras_dir, filename_prefix, dtype=save_dtype, key_format=format)
        name = os.path.relpath(path, loras_dir).replace(os.sep, "/")
        return io.NodeOutput(ui=ui.PreviewText(f"saved {name} in {loras_dir}"))


def _prefix_error(filename_prefix) -> str | None:
    prefix = (filename_prefix or "").replace("\\", "/")
    if not prefix.strip() or prefix.startswith("/") or ".." in prefix.split("/") or "\x00" in prefix:
        return f"filename_prefix: {filename_prefix!r} must be a relative name inside models/loras/"
    return None


NODES = [LTDataset, LTLoraTrainer, LTSaveLora]
