"""LTDataset, LTLoraTrainer, LTSaveLora: node glue around training/ (no training logic here)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..training import config as cfg
from ..training import data_files, optim, options
from ..training.dataset import build_dataset
from ..training.engine import LoraTrainer
from ..training.latent_dataset import latent_dataset
from ..training.save import SAVE_FORMATS, save_lora_file
from . import paths
from .input_checks import checked_execution, checked_validation
from .training_inputs import config_values, node_inputs

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
    for name, allowed in choices.items():
        if name in values and values[name] not in allowed:
            return f"{name}: {values[name]!r} is not one of {list(allowed)}"
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
                "and only encode what changed. Images go to aspect-ratio buckets; batches stay within a bucket. "
                "Or connect a LATENT batch (e.g. VAEEncode) with captions and leave the folder empty."
            ),
            inputs=[
                io.String.Input(
                    "folder",
                    default="",
                    tooltip="Folder under ComfyUI's input/ folder (e.g. 'my_concept'); elsewhere only where "
                    "the server allows it (LUMINA_TURBO_TRAINING_ROOTS). Every image needs a .txt caption "
                    "with the same name. Empty when latents are connected.",
                ),
                io.Vae.Input(
                    "vae",
                    optional=True,
                    tooltip="The VAE of the model you will train (encodes the images once; not needed "
                    "for latents).",
                ),
                io.Clip.Input(
                    "clip",
                    tooltip="The text encoder of the model you will train (encodes each caption once).",
                ),
                *node_inputs(options.DATASET_NODE),
                io.String.Input(
                    "cache_dir",
                    default="",
                    optional=True,
                    tooltip=f"Cache folder under ComfyUI's output/ (or an allowed training root); empty = "
                    f"output/{CACHE_FOLDER}/. Safe to delete any time.",
                ),
                io.Latent.Input(
                    "latents",
                    optional=True,
                    tooltip="Train on these latents instead of a folder (e.g. from VAEEncode, or a batch "
                    "of images): leave folder empty and give captions. No VAE round trip.",
                ),
                io.String.Input(
                    "captions",
                    default="",
                    multiline=True,
                    optional=True,
                    tooltip="With latents: one caption per latent, one per line, or a single line for all.",
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
        error = _choice_error({"system_prompt": system_prompt}, {"system_prompt": options.SYSTEM_PROMPTS})
        if error:
            return error
        try:
            # linked, or empty (latents may be connected; a link's value is not known yet): execute checks
            if folder is not None and folder.strip():
                _scan(folder)
            if cache_dir is not None:
                _cache_root(cache_dir)
        except ValueError as exc:  # DatasetError, PathRefused
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, num_repeats=1, latents=None, **kwargs):
        if latents is not None:
            return "latents"  # the upstream node's own cache key covers them
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
        clip,
        resolution,
        bucket_step,
        enable_bucket,
        caption_dropout,
        system_prompt,
        num_repeats,
        max_sequence_length,
        vae=None,
        cache_dir="",
        latents=None,
        captions="",
    ) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        if latents is not None and (folder or "").strip():
            raise data_files.DatasetError("folder: leave it empty when latents are connected (one source)")
        if latents is None and not (folder or "").strip():
            raise data_files.DatasetError(
                "folder: empty; give a folder under ComfyUI's input/ folder, or connect latents"
            )
        records = None if latents is not None else _scan(folder, num_repeats)
        if records is not None and vae is None:
            raise data_files.DatasetError("vae: needed to encode the images of a folder (or connect latents)")
        cache_root = _cache_root(cache_dir)
        bar = None

        def progress(done, total):
            nonlocal bar
            bar = bar or comfy.utils.ProgressBar(total)
            bar.update_absolute(done, total)
            comfy.model_management.throw_exception_if_processing_interrupted()

        shared = dict(
            clip=clip,
            cache_root=cache_root,
            caption_dropout_rate=caption_dropout,
            max_sequence_length=max_sequence_length,
            system_prompt=system_prompt,
            progress=progress,
        )
        if latents is not None:
            dataset = latent_dataset(latents, captions or "", num_repeats=num_repeats, **shared)
        else:
            dataset = build_dataset(
                records,
                vae=vae,
                resolution=resolution,
                bucket_step=bucket_step,
                enable_bucket=enable_bucket,
                **shared,
            )
        s = dataset.stats
        buckets = sorted({item.size for item in dataset.items})
        text = (
            f"{s['images']} images, {dataset.num_samples} samples per epoch, buckets {buckets}; latents: "
            f"{s['latents_encoded']} encoded, {s['latents_cached']} from cache; captions: {s['texts_encoded']} "
            f"encoded, {s['texts_cached']} from cache ({cache_root})"
        )
        return io.NodeOutput(dataset, ui=ui.PreviewText(text))


COMBOS = {options.widget_name(name): options.choices(name) for name in options.node_options(options.TRAINER)}
COMBOS = {name: choices for name, choices in COMBOS.items() if choices is not None}
# The advanced box sets only what no node input and no headless-only key sets.
RESERVED = (set(options.toml_options()) - set(options.advanced_box_options())) | {"sources"}


def trainer_config(widgets: dict, advanced: str) -> cfg.TrainConfig:
    """Widget values + the advanced TOML box -> a validated TrainConfig (errors name the input)."""
    flat = config_values(options.TRAINER, widgets)
    base = cfg.config_from_flat(flat, origin="LTLoraTrainer")
    return cfg.parse_advanced(advanced, base, reserved=RESERVED, origin="advanced")


class LTLoraTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        trainer_widgets = node_inputs(options.TRAINER)
        # run_name sits before the checkpoint inputs, where saved workflows expect it
        run_name_at = options.node_options(options.TRAINER).index("save_every_n_steps")
        return io.Schema(
            node_id="LTLoraTrainer",
            display_name="LT AC-RF LoRA Trainer",
            category="LuminaTurbo/training",
            description=(
                "Trains a LoRA on Lumina-2 / Z-Image with AC-RF anchor timesteps (the Turbo schedule), the AC-RF trainer's "
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
                *trainer_widgets[:run_name_at],
                io.String.Input(
                    "run_name",
                    default="lora_run",
                    tooltip=f"Checkpoint folder name under output/{RUNS_FOLDER}/ (letters, digits, . _ -).",
                ),
                *trainer_widgets[run_name_at:],
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
            cfg.parse_advanced(advanced or "", cfg.validate(widgets, "LTLoraTrainer"), reserved=RESERVED)
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
                    options=list(options.SAVE_DTYPES),
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
    def validate_inputs(cls, filename_prefix, save_dtype, format):
        error = _choice_error(
            {"save_dtype": save_dtype, "format": format},
            {"save_dtype": options.SAVE_DTYPES, "format": SAVE_FORMATS},
        )
        if error:
            return error
        if filename_prefix is not None:  # linked: checked in execute
            return _prefix_error(filename_prefix) or True
        return True

    @classmethod
    @checked_execution
    def execute(cls, lora, filename_prefix, save_dtype, format) -> io.NodeOutput:
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
