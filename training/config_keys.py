"""Every key the training TOML (and the node's advanced box) accepts: its sections, aliases, meaning.

Sections and names follow the public AC-RF trainer's config/acrf_config.toml (seed 003); the loss-mode
parameters are losses.flow_loss's. ``RUN_IDENTITY_EXCLUDED`` lists the keys a resumed run may change.
"""

from __future__ import annotations

from ..losses import LOSS_MODES

LOSS_PARAM_NAMES = sorted({name for params in LOSS_MODES.values() for name in params})

# name -> (sections it may appear in, short description). Sections: the TOML tables.
_MODEL, _ACRF, _LORA, _TRAIN, _ADV, DATASET_SECTION = (
    "model",
    "acrf",
    "lora",
    "training",
    "advanced",
    "dataset",
)
FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "transformer": ((_MODEL,), "transformer: a diffusers folder or a .safetensors file"),
    "text_encoder": ((_MODEL,), "text encoder file (or empty: the diffusers folder's)"),
    "vae": ((_MODEL,), "VAE file (or empty: the diffusers folder's)"),
    "weight_dtype": ((_MODEL,), "default | fp32 | bf16 | fp16 | fp8_e4m3fn | fp8_e4m3fn_fast | fp8_e5m2"),
    "output_dir": ((_MODEL,), "where the LoRA is written (default: ComfyUI's models/loras)"),
    "output_name": ((_MODEL,), "LoRA file name without extension"),
    "save_dtype": ((_MODEL,), "bf16 | fp16 | fp32"),
    "turbo_steps": ((_ACRF,), "number of anchors (the Turbo step count)"),
    "shift": ((_ACRF,), "static time shift of the anchors / shifted sampling (Z-Image: 3.0)"),
    "jitter_scale": ((_ACRF,), "Gaussian jitter of the anchor sigmas"),
    "anchor_convention": ((_ACRF,), "zimage | diffusers (how the anchors are spaced)"),
    "timestep_method": ((_ACRF,), "anchor | uniform | shifted_sigmoid"),
    "enable_turbo": ((_ACRF,), "AC-RF switch: false = uniform (shifted) timesteps"),
    "sigmoid_mean": ((_ACRF,), "logit-normal mean (shifted_sigmoid)"),
    "sigmoid_scale": ((_ACRF,), "logit-normal scale (shifted_sigmoid)"),
    "raft_mode": ((_ACRF,), "mix free-stream (uniform shifted) sigmas into anchor batches"),
    "free_stream_ratio": ((_ACRF,), "share of free-stream samples when raft_mode"),
    "latent_jitter_scale": ((_ACRF,), "noise added to x_sigma, target unchanged"),
    "use_dynamic_shift": ((_ACRF,), "must be false (see docs)"),
    "curvature_weight": ((_ACRF, _TRAIN), "weight of the curvature penalty (0 = off)"),
    "curvature_interval": ((_ACRF, _TRAIN), "apply the curvature penalty every N micro-steps"),
    "curvature_step": ((_ACRF, _TRAIN), "finite-difference step in sigma (0 = mean anchor spacing)"),
    "curvature_start_step": ((_ACRF, _TRAIN), "first optimizer step with the curvature penalty"),
    "replay_ratio": ((_ACRF, _TRAIN), "replays per batch sample, trained on top of each batch"),
    "replay_capacity": ((_ACRF, _TRAIN), "replay buffer size"),
    "replay_min_entries": ((_ACRF, _TRAIN), "no replay before the buffer holds this many"),
    "network_dim": ((_LORA,), "LoRA rank"),
    "network_alpha": ((_LORA,), "LoRA alpha (scale = alpha / rank)"),
    "train_attention": ((_LORA,), "LoRA on attention qkv and out of the main layers"),
    "train_ffn": ((_LORA,), "LoRA on feed_forward w1, w2, w3 of the main layers"),
    "train_refiners": ((_LORA,), "also the noise/context refiner blocks"),
    "train_adaln": ((_LORA,), "also the adaLN modulation layers"),
    "optimizer_type": ((_TRAIN,), "AdamW | AdamW8bit | Adafactor | Prodigy"),
    "learning_rate": ((_TRAIN,), "peak learning rate"),
    "weight_decay": ((_TRAIN,), "decoupled weight decay"),
    "lr_scheduler": ((_TRAIN,), "constant | constant_with_warmup | linear | cosine | cosine_with_restarts"),
    "lr_warmup_steps": ((_TRAIN,), "linear warmup steps"),
    "lr_num_cycles": ((_TRAIN,), "cycles of cosine_with_restarts"),
    "loss_mode": ((_TRAIN, "loss"), "standard | frequency | style | unified"),
    "enable_freq": ((_TRAIN, "loss"), "AC-RF switch for the frequency terms"),
    "enable_style": ((_TRAIN, "loss"), "AC-RF switch for the style terms"),
    "style_basis": ((_TRAIN, "loss"), "latent_rgb | channels (luminance/colour of the style terms)"),
    "snr_gamma": ((_TRAIN,), "Min-SNR gamma (0 = off)"),
    "snr_form": ((_TRAIN,), "rectified_flow_velocity | vp_v_prediction | epsilon | x0"),
    "snr_floor": ((_TRAIN,), "lower bound of the Min-SNR weight"),
    "num_train_epochs": ((_TRAIN,), "epochs (0 = use max_train_steps)"),
    "max_train_steps": ((_TRAIN,), "optimizer steps when num_train_epochs is 0"),
    "gradient_accumulation_steps": ((_TRAIN,), "micro-batches per optimizer step"),
    "seed": ((_TRAIN,), "seed of LoRA init, data order, sigmas and noise"),
    "save_every_n_steps": ((_TRAIN,), "checkpoint interval in optimizer steps (0 = only at the end)"),
    "resume": ((_TRAIN,), "continue from this run's checkpoint when there is one"),
    "checkpoint_dir": (
        (_TRAIN,),
        "folder of the checkpoint (default: ComfyUI output/lumina_turbo_training/<name>)",
    ),
    "max_grad_norm": ((_ADV, _TRAIN), "gradient clipping (0 = off)"),
    "gradient_checkpointing": ((_ADV, _TRAIN), "recompute block activations in backward"),
    "mixed_precision": ((_ADV, _TRAIN), "bf16 | fp32 (model compute dtype)"),
    "blocks_to_swap": ((_ADV, _TRAIN), "last N main blocks kept in RAM and streamed per layer"),
    "folder": ((DATASET_SECTION,), "image folder with same-name .txt captions"),
    "batch_size": ((DATASET_SECTION,), "samples per micro-batch (drawn within one bucket)"),
    "shuffle": ((DATASET_SECTION,), "shuffle batches every epoch"),
    "enable_bucket": ((DATASET_SECTION,), "aspect-ratio buckets (false: square crops)"),
    "resolution": ((DATASET_SECTION,), "bucket area = resolution^2 pixels"),
    "bucket_step": ((DATASET_SECTION,), "bucket sides are multiples of this (pixels)"),
    "max_aspect_ratio": ((DATASET_SECTION,), "widest bucket aspect ratio"),
    "caption_dropout_rate": ((DATASET_SECTION,), "probability of training a sample with the empty caption"),
    "max_sequence_length": ((DATASET_SECTION,), "text tokens kept per caption"),
    "num_repeats": ((DATASET_SECTION,), "repeats of images outside N_name folders"),
    "caption_extension": ((DATASET_SECTION,), "caption file extension"),
    "cache_dir": (
        (DATASET_SECTION,),
        "latent/text cache folder (default: ComfyUI output/lumina_turbo_cache)",
    ),
    "system_prompt": ((DATASET_SECTION,), "Lumina-2 system prompt: none | superior | alignment"),
}
for _name in LOSS_PARAM_NAMES:
    FIELDS[_name] = ((_TRAIN, "loss"), "loss-mode parameter (losses.flow_loss)")
# The seed's spellings of our names.
ALIASES = {
    "dit": "transformer",
    "lambda_cosine": "lambda_cos",
    "lambda_curvature": "curvature_weight",
    "bucket_reso_steps": "bucket_step",
    "drop_text_ratio": "caption_dropout_rate",
    "save_every_n_step": "save_every_n_steps",
}
ALIAS_SECTIONS = {
    "dit": (_MODEL,),
    "lambda_curvature": (_ACRF, _TRAIN),
    "drop_text_ratio": (_TRAIN, DATASET_SECTION),
}
SECTIONS = (_MODEL, _ACRF, _LORA, _TRAIN, _ADV, DATASET_SECTION, "loss")
SOURCE_KEYS = {"folder", "num_repeats"}
# Keys that change what is trained (a resumed run must match them exactly).
RUN_IDENTITY_EXCLUDED = {
    "max_train_steps",
    "num_train_epochs",
    "save_every_n_steps",
    "resume",
    "checkpoint_dir",
    "output_dir",
    "output_name",
    "save_dtype",
    "transformer",
    "text_encoder",
    "vae",
    "cache_dir",
    "blocks_to_swap",
    "gradient_checkpointing",
    # what LTDataset builds is identified by the dataset's own key (files, models, resolution, dropout)
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
    "system_prompt",
    "weight_dtype",
}
