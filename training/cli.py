"""Headless training: ``python -m lumina_turbo.train --config file.toml`` (same engine as LTLoraTrainer).

The package must be importable as ``lumina_turbo`` - inside a ComfyUI install that is
``PYTHONPATH=ComfyUI/custom_nodes``. ComfyUI itself is found from ``--comfyui``, ``$COMFYUI_PATH``, the
folder above ``custom_nodes/`` the package was imported from, or this repository's ``.comfyui/`` dev host.
Relative paths in the TOML (model files, dataset folders, output/checkpoint/cache folders) are relative to
the TOML file's folder; model names that are not paths are looked up in ComfyUI's models/ folders.
Exit status: 0 done, 2 bad config/data/model (one-line error, no traceback), 3 training stopped (NaN),
4 another process of a multi-process run stopped or did not answer (the last checkpoint is intact),
130 interrupted (a checkpoint was written; run the same command to resume).

Several processes: ``torchrun --nproc_per_node N -m lumina_turbo.train --config file.toml`` or
``accelerate launch --multi_gpu --num_processes N -m lumina_turbo.train --config file.toml``; each
process trains batch_size samples of every step (see training/distributed.py), rank 0 writes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from . import config as cfg

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def find_comfyui(explicit: str | None) -> Path:
    candidates = [explicit, os.environ.get("COMFYUI_PATH")]
    package = sys.modules.get("lumina_turbo")
    if package is not None and getattr(package, "__file__", None):
        imported_from = Path(package.__file__).parent  # not resolved: the custom_nodes link, if any
        if imported_from.parent.name == "custom_nodes":
            candidates.append(str(imported_from.parent.parent))
    candidates.append(str(PACKAGE_ROOT / ".comfyui"))
    for candidate in candidates:
        if candidate and (Path(candidate) / "comfy" / "model_management.py").is_file():
            return Path(candidate).resolve()
    raise cfg.ConfigError(
        "ComfyUI not found: pass --comfyui /path/to/ComfyUI (or set COMFYUI_PATH); the trainer uses its model "
        "management and model classes"
    )


def bootstrap_comfyui(root: Path, cpu: bool) -> None:
    # ComfyUI's folder first: its top-level modules (nodes, utils, server) must win over any folder of
    # the same name earlier on sys.path (this pack's own nodes/ when run from its folder).
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    import torch
    import utils.extra_config  # noqa: F401  (ComfyUI's utils package must win over comfy/utils.py)
    from comfy.cli_args import args

    accelerator = (
        torch.cuda.is_available()
        or torch.backends.mps.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
    )
    args.cpu = args.cpu or cpu or not accelerator
    import comfy.model_management  # noqa: F401  (reads args at import)


def _path(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def load_models(config: cfg.TrainConfig, base: Path):
    import folder_paths

    from ..loading import model_files

    try:
        options = model_files.weight_dtype_options(config.weight_dtype)
    except ValueError as error:
        raise cfg.ConfigError(f"[model] {error}") from error
    if not config.transformer:
        raise cfg.ConfigError(
            "[model] transformer (or dit) is required: a diffusers folder or a transformer file"
        )

    def locate(value: str, kinds: tuple[str, ...]) -> Path:
        path = _path(value, base)
        if path.exists():
            return path
        for kind in kinds:
            for root in folder_paths.get_folder_paths(kind):
                if (Path(root) / value).exists():
                    return Path(root) / value
        raise cfg.ConfigError(
            f"[model] {value!r} is neither a path nor a name in ComfyUI's models/{'/'.join(kinds)}"
        )

    transformer = locate(config.transformer, ("diffusers", "diffusion_models"))
    if transformer.is_dir():
        model = model_files.load_transformer_folder(transformer, **options)
        clip = model_files.clip_from_diffusers_folder(transformer) if not config.text_encoder else None
        vae = model_files.vae_from_diffusers_folder(transformer) if not config.vae else None
    else:
        if not config.text_encoder or not (config.vae or config.latents):
            raise cfg.ConfigError("[model] a single transformer file needs text_encoder and vae files too")
        model, clip, vae = model_files.load_transformer_file(transformer, **options), None, None
    if clip is None:
        clip = model_files.load_text_encoder_file(locate(config.text_encoder, ("text_encoders", "clip")))
    if vae is None and config.vae:  # latents need no VAE
        vae = model_files.load_vae_file(locate(config.vae, ("vae",)))
    return model, clip, vae


def dataset_records(config: cfg.TrainConfig, base: Path):
    from .data_files import DatasetError, scan_folder

    if config.latents:
        from .latent_dataset import load_latents_file

        if config.folder or config.sources:
            raise cfg.ConfigError("[dataset] latents and folder (or sources) are exclusive; give one")
        return load_latents_file(
            _path(config.latents, base), config.caption_extension, num_repeats=config.num_repeats
        )
    sources = list(config.sources)
    if config.folder:
        sources.insert(0, {"folder": config.folder, "num_repeats": config.num_repeats})
    if not sources:
        raise cfg.ConfigError("[dataset] folder (or [[dataset.sources]] folder, or latents) is required")
    records = []
    for source in sources:
        folder = _path(source["folder"], base)
        if not folder.is_dir():
            raise DatasetError(f"[dataset] folder {folder} does not exist or is not a folder")
        records += scan_folder(
            folder, num_repeats=source.get("num_repeats", 1), caption_extension=config.caption_extension
        )
    return records


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m lumina_turbo.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--config", required=True, help="TOML file with [model] [acrf] [lora] [training] [dataset]"
    )
    parser.add_argument("--comfyui", help="ComfyUI folder (default: found automatically)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU")
    parser.add_argument(
        "--check", action="store_true", help="only validate the config and the dataset folder"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    config_path = Path(options.config).resolve()
    base = config_path.parent
    try:
        config = cfg.load_toml(config_path)
        has_data = config.folder or config.sources or config.latents
        records = dataset_records(config, base) if has_data else None
        if options.check:
            if records is None:
                dataset_records(config, base)
            kind = "captioned latents" if config.latents else "captioned images"
            print(f"ok: {config_path} is valid; {len(records or [])} {kind}")
            return 0
        return _train(config, options, base, records)
    except KeyboardInterrupt:
        print(
            "interrupted: the last completed step was checkpointed; run the same command to resume",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:
        from .checkpoint import CheckpointMismatch
        from .data_files import DatasetError
        from .distributed import DistributedSetupError, ProcessLost
        from .optim import OptimizerUnavailable

        known = (
            cfg.ConfigError,
            DatasetError,
            CheckpointMismatch,
            OptimizerUnavailable,
            DistributedSetupError,
        )
        if isinstance(exc, ProcessLost):
            print(f"error: {exc}", file=sys.stderr)
            return 4
        if isinstance(exc, known) or type(exc).__name__ in ("ModelFileError", "TrainingDiverged"):
            print(f"error: {exc}", file=sys.stderr)
            return 3 if type(exc).__name__ == "TrainingDiverged" else 2
        if type(exc).__name__ == "InterruptProcessingException":
            print("interrupted: checkpoint written; run the same command to resume", file=sys.stderr)
            return 130
        raise


def _train(config: cfg.TrainConfig, options, base: Path, records) -> int:
    bootstrap_comfyui(find_comfyui(options.comfyui), options.cpu)
    from . import distributed

    ranks = distributed.start()
    try:
        return _train_on_ranks(config, options, base, records, ranks)
    finally:
        ranks.close()


def _build_dataset(config: cfg.TrainConfig, records, vae, clip, cache_root: Path, ranks, bar):
    """Each rank encodes its share of what the cache lacks; once all shares are written the dataset
    (paths only) is complete on every rank. Returns it and the run's stats (summed over the ranks)."""
    import torch

    from .dataset import build_dataset, prompt_text
    from .latent_dataset import LatentData, build_from_latents

    if isinstance(records, LatentData):  # nothing to encode but captions: every rank writes the same files
        with torch.inference_mode():
            dataset = build_from_latents(
                records,
                clip=clip,
                cache_root=cache_root,
                caption_dropout_rate=config.caption_dropout_rate,
                max_sequence_length=config.max_sequence_length,
                system_prompt=config.system_prompt,
            )
        if ranks.world_size > 1:
            ranks.barrier("waiting for the other processes' latent cache")
        return dataset, dataset.stats
    with torch.inference_mode():
        dataset = build_dataset(
            records,
            vae=vae,
            clip=clip,
            cache_root=cache_root,
            resolution=config.resolution,
            bucket_step=config.bucket_step,
            enable_bucket=config.enable_bucket,
            max_aspect_ratio=config.max_aspect_ratio,
            caption_dropout_rate=config.caption_dropout_rate,
            max_sequence_length=config.max_sequence_length,
            system_prompt=config.system_prompt,
            progress=lambda done, total: bar.update(done - bar.n) if bar.total == total else bar.reset(total),
            share=(ranks.rank, ranks.world_size),
        )
    if ranks.world_size == 1:
        return dataset, dataset.stats
    ranks.barrier("waiting for the other processes' share of the data cache")
    mine = torch.tensor([dataset.stats["latents_encoded"], dataset.stats["texts_encoded"]])
    encoded = torch.stack(ranks.all_gather_tensor(mine, "counting the encoded items")).sum(0).tolist()
    prompts = {prompt_text(r.caption, config.system_prompt) for r in records} | {
        prompt_text("", config.system_prompt)
    }
    stats = {
        **dataset.stats,
        "latents_encoded": encoded[0],
        "latents_cached": dataset.stats["images"] - encoded[0],
        "texts_encoded": encoded[1],
        "texts_cached": len(prompts) - encoded[1],
    }
    return dataset, stats


def _train_on_ranks(config: cfg.TrainConfig, options, base: Path, records, ranks) -> int:
    import comfy.model_management as mm
    import folder_paths
    from tqdm.auto import tqdm

    from .data_files import DatasetError
    from .distributed import ProcessLost
    from .engine import LoraTrainer
    from .save import save_lora_file

    quiet = not ranks.is_main  # rank 0 alone prints and writes
    ranks.check_same("configs", config.model_dump())
    if records is None:
        records = dataset_records(config, base)
    samples = len(records) * records.num_repeats if config.latents else sum(r.repeats for r in records)
    if samples < ranks.world_size:
        raise DatasetError(
            f"[dataset] {samples} image(s) (repeats included) for {ranks.world_size} processes: every process "
            f"needs at least one; launch at most {samples} processes or add images"
        )
    model, clip, vae = load_models(config, base)
    output = Path(folder_paths.get_output_directory())
    cache_root = _path(config.cache_dir, base) if config.cache_dir else output / "lumina_turbo_cache"
    with tqdm(total=len(records) + 1, desc="caching latents and captions", leave=False, disable=quiet) as bar:
        dataset, s = _build_dataset(config, records, vae, clip, cache_root, ranks, bar)
    ranks.check_same("datasets (cached images and captions)", dataset.key)
    if not quiet:
        processes = f" ({ranks.world_size} processes)" if ranks.world_size > 1 else ""
        print(
            f"dataset: {s['images']} images, latents {s['latents_encoded']} encoded / {s['latents_cached']} cached, "
            f"captions {s['texts_encoded']} encoded / {s['texts_cached']} cached ({cache_root}){processes}"
        )
    del vae, clip
    run_dir = (
        _path(config.checkpoint_dir, base)
        if config.checkpoint_dir
        else (output / "lumina_turbo_training" / config.output_name)
    )
    with tqdm(desc="training", unit="step", disable=quiet) as bar:

        def on_step(step, total, loss, lr):
            bar.total = total
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

        trainer = LoraTrainer(
            config,
            model,
            dataset,
            run_dir=run_dir,
            on_step=on_step,
            check_interrupt=mm.throw_exception_if_processing_interrupted,
            ranks=ranks,
        )
        try:
            result = trainer.run()
        except ProcessLost as exc:
            raise ProcessLost(
                f"{exc}. The last checkpoint in {run_dir} is intact: run the same command to resume"
            ) from exc
    if quiet:
        return 0
    out_dir = (
        _path(config.output_dir, base)
        if config.output_dir
        else Path(folder_paths.get_folder_paths("loras")[0])
    )
    path = save_lora_file(
        result.lora,
        out_dir,
        config.output_name,
        dtype=config.save_dtype,
        exact_path=out_dir / f"{config.output_name}.safetensors",
    )
    # The LoRA is saved: nothing is left that an interrupt could protect, so a late Ctrl-C must not
    # turn a finished run into a KeyboardInterrupt traceback (signals can be set from the main thread only).
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        last = f", final loss {result.loss_history[-1]:.5g}" if result.loss_history else ""
        print(
            f"saved {path} ({result.steps} steps, resumed at {result.resumed_from}{last}); "
            f"checkpoint {result.checkpoint}"
        )
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 0
