"""Every trainer option, defined once: TOML section(s), type, default, bounds, choices, help text and,
for the options shown on a node, the node and input name.

The TOML reader (training/config.py), its validation and error messages, the LTLoraTrainer and
LTDataset inputs and tooltips (nodes/training_inputs.py) and the options table in the README
(``python -m lumina_turbo.devtools.options_table``) are all derived from :class:`TrainConfig`.
Adding an option is one :func:`option` line here (plus its test).

Declaration order matters only for the nodes: options shown on a node appear in this order.
Time convention: sigmas are ComfyUI sigmas (1 = noise, 0 = data).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from ..loading.model_files import DTYPES
from ..losses import LOSS_MODES, MIN_SNR_FORMS, TIMESTEP_METHODS
from ..samplers.schedules import ANCHOR_CONVENTIONS

OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")
PRECISIONS = ("bf16", "fp32")
WEIGHT_DTYPES = tuple(DTYPES)  # the loader's choices
SAVE_DTYPES = ("bf16", "fp16", "fp32")
STYLE_BASES = ("latent_rgb", "channels")
SYSTEM_PROMPTS = ("none", "superior", "alignment")

MODEL, ACRF, LORA, TRAINING, ADVANCED, DATASET, LOSS = (
    "model", "acrf", "lora", "training", "advanced", "dataset", "loss",
)  # fmt: skip
SECTIONS = (MODEL, ACRF, LORA, TRAINING, ADVANCED, DATASET, LOSS)
TRAINER, DATASET_NODE = "LTLoraTrainer", "LTDataset"
MAX_INT = 2**63 - 1


class ConfigError(ValueError):
    """A configuration value or key the trainer cannot use; the message names it."""


def option(
    default,
    sections: str | tuple[str, ...],
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    node: str | None = None,
    widget: str | None = None,
    step: float | None = None,
    identity: bool = True,
    headless: bool = False,
) -> Any:
    """One option. ``node``/``widget``: shown on that node as that input (default: the option's name);
    ``step``: the widget's increment; ``identity``: a resumed run must keep this value (it shapes what
    is trained), False for what may change between runs (step counts, paths, memory savers);
    ``headless``: read by the command line only (the nodes get it from the graph or their own inputs)."""
    extra = {
        "sections": (sections,) if isinstance(sections, str) else tuple(sections),
        "node": node,
        "widget": widget,
        "step": step,
        "identity": identity,
        "headless": headless,
    }
    return Field(default, ge=ge, gt=gt, le=le, description=help, json_schema_extra=extra)


class TrainConfig(BaseModel):
    """All trainer settings, validated on construction (types strict, numbers finite and in range).

    Cross-option rules (e.g. blocks_to_swap needs gradient_checkpointing) are in config.validate."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    # --- shown on LTLoraTrainer, in its order --------------------------------------------------
    max_train_steps: int = option(
        500,
        TRAINING,
        "Optimizer steps (when num_train_epochs is 0).",
        ge=1,
        le=1_000_000,
        node=TRAINER,
        widget="steps",
        identity=False,
    )
    learning_rate: float = option(
        1e-4, TRAINING, "Peak learning rate.", ge=1e-7, le=1.0, node=TRAINER, step=1e-6
    )
    network_dim: int = option(16, LORA, "LoRA rank.", ge=1, le=1024, node=TRAINER, widget="rank")
    network_alpha: float = option(
        16.0,
        LORA,
        "LoRA alpha; the update is scaled by alpha / rank.",
        ge=0.001,
        le=4096.0,
        node=TRAINER,
        widget="alpha",
        step=0.5,
    )
    batch_size: int = option(
        1, DATASET, "Samples per micro-batch, drawn within one bucket.", ge=1, le=256, node=TRAINER
    )
    gradient_accumulation_steps: int = option(
        1,
        TRAINING,
        "Micro-batches per optimizer step.",
        ge=1,
        le=1024,
        node=TRAINER,
        widget="gradient_accumulation",
    )
    seed: int = option(
        42,
        TRAINING,
        "Seeds LoRA init, data order, sigmas and noise (exact resume relies on it).",
        ge=0,
        le=MAX_INT,
        node=TRAINER,
    )
    timestep_method: Literal[TIMESTEP_METHODS] = option(
        "anchor",
        ACRF,
        "anchor: AC-RF anchors of the Turbo schedule (+ jitter); uniform / shifted_sigmoid: "
        "for non-Turbo training.",
        node=TRAINER,
    )
    turbo_steps: int = option(
        10, ACRF, "Number of anchors = the step count you will sample with.", ge=1, le=1000, node=TRAINER
    )
    shift: float = option(
        3.0,
        ACRF,
        "Static time shift of the anchors / shifted sampling (Z-Image-Turbo: 3.0).",
        ge=0.01,
        le=100.0,
        node=TRAINER,
        step=0.01,
    )
    jitter_scale: float = option(
        0.02, ACRF, "Gaussian jitter added to each anchor sigma.", ge=0.0, le=1.0, node=TRAINER, step=0.001
    )
    loss_mode: Literal[tuple(LOSS_MODES)] = option(
        "standard",
        (TRAINING, LOSS),
        "standard (MSE + optional L1/cosine), frequency, style, unified; "
        "their parameters in 'advanced' / [loss].",
        node=TRAINER,
    )
    snr_gamma: float = option(
        5.0,
        TRAINING,
        "Min-SNR gamma, rectified-flow form (0 = off); form and floor in 'advanced'.",
        ge=0.0,
        le=100.0,
        node=TRAINER,
        step=0.1,
    )
    replay_ratio: float = option(
        0.0,
        (ACRF, TRAINING),
        "Replays per batch sample: the hardest recent samples "
        "(by unweighted loss) are trained again on top of each batch (0 = off).",
        ge=0.0,
        le=1.0,
        node=TRAINER,
        step=0.05,
    )
    curvature_weight: float = option(
        0.0,
        (ACRF, TRAINING),
        "Weight of the trajectory-curvature penalty (2 extra forward passes; 0 = off).",
        ge=0.0,
        le=100.0,
        node=TRAINER,
        step=0.01,
    )
    train_refiners: bool = option(
        False, LORA, "Also put LoRAs on the noise/context refiner blocks.", node=TRAINER
    )
    train_adaln: bool = option(False, LORA, "Also train the adaLN modulation layers.", node=TRAINER)
    optimizer_type: Literal[OPTIMIZERS] = option(
        "AdamW",
        TRAINING,
        "AdamW; AdamW8bit needs bitsandbytes on CUDA; Prodigy needs prodigyopt.",
        node=TRAINER,
        widget="optimizer",
    )
    lr_scheduler: Literal[LR_SCHEDULERS] = option(
        "constant", TRAINING, "Learning-rate schedule after the warmup.", node=TRAINER
    )
    lr_warmup_steps: int = option(
        0,
        TRAINING,
        "Linear learning-rate warmup steps.",
        ge=0,
        le=1_000_000,
        node=TRAINER,
        widget="warmup_steps",
    )
    mixed_precision: Literal[PRECISIONS] = option(
        "bf16", (ADVANCED, TRAINING), "Model compute dtype; the LoRA itself is always float32.", node=TRAINER
    )
    gradient_checkpointing: bool = option(
        True,
        (ADVANCED, TRAINING),
        "Recompute block activations in backward (less memory, slower).",
        node=TRAINER,
        identity=False,
    )
    blocks_to_swap: int = option(
        0,
        (ADVANCED, TRAINING),
        "Keep the last N main blocks in RAM: the model is loaded without them and "
        "ComfyUI's low-VRAM casting streams them to the GPU layer by layer (larger models fit, slower). "
        "Needs gradient_checkpointing.",
        ge=0,
        le=1000,
        node=TRAINER,
        identity=False,
    )
    save_every_n_steps: int = option(
        100,
        TRAINING,
        "Write a checkpoint every N steps (also on interrupt and at the end; 0 = only then).",
        ge=0,
        le=1_000_000,
        node=TRAINER,
        widget="checkpoint_every",
        identity=False,
    )
    resume: bool = option(
        True,
        TRAINING,
        "Continue from this run's checkpoint when one exists (same settings required).",
        node=TRAINER,
        identity=False,
    )

    # --- shown on LTDataset, in its order (what it caches is keyed by the dataset itself) -------
    resolution: int = option(
        1024,
        DATASET,
        "Training resolution: each bucket holds about resolution x resolution pixels.",
        ge=64,
        le=8192,
        node=DATASET_NODE,
        step=16,
        identity=False,
    )
    bucket_step: int = option(
        64,
        DATASET,
        "Bucket sides are multiples of this many pixels (a multiple of 16).",
        ge=16,
        le=1024,
        node=DATASET_NODE,
        step=16,
        identity=False,
    )
    enable_bucket: bool = option(
        True,
        DATASET,
        "Aspect-ratio buckets; off = every image is centre-cropped to a square.",
        node=DATASET_NODE,
        identity=False,
    )
    caption_dropout_rate: float = option(
        0.0,
        DATASET,
        "Probability of training a sample with the empty caption (helps CFG-free use).",
        ge=0.0,
        le=1.0,
        node=DATASET_NODE,
        widget="caption_dropout",
        step=0.01,
        identity=False,
    )
    system_prompt: Literal[SYSTEM_PROMPTS] = option(
        "none",
        DATASET,
        "Lumina-2 only: prepend the system prompt CLIPTextEncodeLumina2 uses; pick the one "
        "you will sample with. Z-Image: none.",
        node=DATASET_NODE,
        identity=False,
    )
    num_repeats: int = option(
        1,
        DATASET,
        "Repeats of images placed directly in the folder (N_name sub-folders use N).",
        ge=1,
        le=10000,
        node=DATASET_NODE,
        identity=False,
    )
    max_sequence_length: int = option(
        512,
        DATASET,
        "Text tokens kept per caption (longer captions are cut).",
        ge=1,
        le=8192,
        node=DATASET_NODE,
        identity=False,
    )

    # --- [model]: headless only (the nodes get MODEL / CLIP / VAE from the graph) ---------------
    transformer: str = option(
        "", MODEL, "Transformer: a diffusers folder or a .safetensors file.", identity=False, headless=True
    )
    text_encoder: str = option(
        "", MODEL, "Text encoder file (empty: the diffusers folder's).", identity=False, headless=True
    )
    vae: str = option("", MODEL, "VAE file (empty: the diffusers folder's).", identity=False, headless=True)
    weight_dtype: Literal[WEIGHT_DTYPES] = option(
        "default",
        MODEL,
        "Transformer weight dtype (fp8: stored in fp8, computed in the device's dtype).",
        identity=False,
        headless=True,
    )
    output_dir: str = option(
        "", MODEL, "Where the LoRA is written (empty: ComfyUI's models/loras).", identity=False, headless=True
    )
    output_name: str = option(
        "lumina_turbo_lora", MODEL, "LoRA file name without extension.", identity=False, headless=True
    )
    save_dtype: Literal[SAVE_DTYPES] = option(
        "bf16", MODEL, "LoRA tensor dtype in the file.", identity=False, headless=True
    )

    # --- [acrf] -----------------------------------------------------------------------------------
    anchor_convention: Literal[ANCHOR_CONVENTIONS] = option(
        "zimage", ACRF, "How the anchors are spaced: zimage (official) or diffusers."
    )
    sigmoid_mean: float = option(0.0, ACRF, "Logit-normal mean (shifted_sigmoid).", ge=-10, le=10)
    sigmoid_scale: float = option(1.0, ACRF, "Logit-normal scale (shifted_sigmoid).", gt=0, le=10)
    raft_mode: bool = option(False, ACRF, "Mix free-stream (uniform shifted) sigmas into anchor batches.")
    free_stream_ratio: float = option(0.3, ACRF, "Share of free-stream samples when raft_mode.", ge=0, le=1)
    latent_jitter_scale: float = option(0.0, ACRF, "Noise added to x_sigma, target unchanged.", ge=0, le=1)
    use_dynamic_shift: bool = option(False, ACRF, "Must be false: Z-Image-Turbo samples with a static shift.")
    curvature_interval: int = option(
        1, (ACRF, TRAINING), "Apply the curvature penalty every N micro-steps.", ge=1, le=1_000_000
    )
    curvature_step: float = option(
        0.0, (ACRF, TRAINING), "Finite-difference step in sigma (0 = mean anchor spacing).", ge=0, le=0.2495
    )
    curvature_start_step: int = option(
        0, (ACRF, TRAINING), "First optimizer step with the curvature penalty.", ge=0, le=1_000_000
    )
    replay_capacity: int = option(64, (ACRF, TRAINING), "Replay buffer size.", ge=1, le=100_000)
    replay_min_entries: int = option(
        8,
        (ACRF, TRAINING),
        "No replay before the buffer holds this many (at most replay_capacity).",
        ge=1,
        le=100_000,
    )

    # --- [lora] -----------------------------------------------------------------------------------
    train_attention: bool = option(True, LORA, "LoRA on attention qkv and out of the main layers.")
    train_ffn: bool = option(True, LORA, "LoRA on feed_forward w1, w2, w3 of the main layers.")

    # --- [training] -------------------------------------------------------------------------------
    weight_decay: float = option(0.01, TRAINING, "Decoupled weight decay.", ge=0, le=1)
    lr_num_cycles: int = option(1, TRAINING, "Cycles of cosine_with_restarts.", ge=1, le=10_000)
    style_basis: Literal[STYLE_BASES] = option(
        "latent_rgb", (TRAINING, LOSS), "Luminance/colour basis of the style terms: latent_rgb or channels."
    )
    snr_form: Literal[MIN_SNR_FORMS] = option(
        "rectified_flow_velocity", TRAINING, "Min-SNR weight form (vp_v_prediction reproduces AC-RF)."
    )
    snr_floor: float = option(0.1, TRAINING, "Lower bound of the Min-SNR weight.", ge=0, le=1)
    num_train_epochs: int = option(
        0, TRAINING, "Epochs (0 = use max_train_steps).", ge=0, le=1_000_000, identity=False, headless=True
    )
    checkpoint_dir: str = option(
        "",
        TRAINING,
        "Checkpoint folder (empty: ComfyUI output/lumina_turbo_training/<name>).",
        identity=False,
        headless=True,
    )

    # --- [advanced] -------------------------------------------------------------------------------
    max_grad_norm: float = option(1.0, (ADVANCED, TRAINING), "Gradient clipping (0 = off).", ge=0, le=1e6)

    # --- [dataset]: headless only -------------------------------------------------------------------
    folder: str = option(
        "", DATASET, "Image folder with same-name caption files.", identity=False, headless=True
    )
    latents: str = option(
        "",
        DATASET,
        "Instead of folder: a safetensors file of latents [N, C, h, w] (raw VAE "
        "space, e.g. ComfyUI's .latent) with a same-name caption file, one caption per line "
        "or one for all.",
        identity=False,
        headless=True,
    )
    shuffle: bool = option(True, DATASET, "Shuffle batches every epoch.")
    max_aspect_ratio: float = option(
        4.0, DATASET, "Widest bucket aspect ratio.", ge=1, le=16, identity=False, headless=True
    )
    caption_extension: str = option(".txt", DATASET, "Caption file extension.", identity=False, headless=True)
    cache_dir: str = option(
        "",
        DATASET,
        "Latent/text cache folder (empty: ComfyUI output/lumina_turbo_cache).",
        identity=False,
        headless=True,
    )

    # Not options of their own: [[dataset.sources]] tables and the loss-mode parameters (losses.LOSS_MODES).
    sources: list[dict] = Field(default_factory=list, json_schema_extra={"identity": False})
    loss_params: dict[str, float] = Field(default_factory=dict)

    def __init__(self, **values):
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(describe_errors(exc, "TrainConfig")) from None

    def replace(self, **changes) -> TrainConfig:
        """A validated copy with ``changes``."""
        return TrainConfig(**{**self.model_dump(), **changes})


def fields() -> dict[str, FieldInfo]:
    return TrainConfig.model_fields


def extra(name: str) -> dict:
    return fields()[name].json_schema_extra or {}


def choices(name: str) -> tuple | None:
    annotation = fields()[name].annotation
    return (
        getattr(annotation, "__args__", None) if getattr(annotation, "__origin__", None) is Literal else None
    )


def bounds(name: str) -> tuple[float | None, float | None, bool]:
    """(low, high, low_is_open) of a numeric option."""
    low = high = None
    open_low = False
    for constraint in fields()[name].metadata:
        if hasattr(constraint, "ge"):
            low = constraint.ge
        elif hasattr(constraint, "gt"):
            low, open_low = constraint.gt, True
        elif hasattr(constraint, "le"):
            high = constraint.le
    return low, high, open_low


def expected(name: str) -> str:
    """What a valid value of the option looks like, for error messages and the docs."""
    field = fields()[name]
    options = choices(name)
    if options is not None:
        return f"one of {list(options)}"
    if field.annotation is bool:
        return "true or false"
    if field.annotation is str:
        return "a string"
    low, high, open_low = bounds(name)
    kind = "an integer" if field.annotation is int else "a number"
    parts = ([f"> {low}" if open_low else f">= {low}"] if low is not None else []) + (
        [f"<= {high}"] if high is not None else []
    )
    return f"{kind} {' and '.join(parts)}".rstrip()


def toml_options() -> list[str]:
    """Names a TOML file may set directly (the loss parameters are added by config.py)."""
    return [name for name in fields() if "sections" in extra(name)]


def node_options(node: str) -> list[str]:
    """The options shown on ``node``, in input order."""
    return [name for name in fields() if extra(name).get("node") == node]


def widget_name(name: str) -> str:
    return extra(name).get("widget") or name


def advanced_box_options() -> list[str]:
    """What the trainer node's 'advanced' box may set: every option not shown on a node, not headless."""
    return [
        name for name in toml_options() if extra(name).get("node") is None and not extra(name).get("headless")
    ]


def identity_options() -> list[str]:
    return [name for name in fields() if extra(name).get("identity", True)]


def describe_errors(exc: ValidationError, origin: str) -> str:
    """pydantic's errors -> 'origin: name must be <expected>, got <value>' (the first one)."""
    error = exc.errors()[0]
    name = str(error["loc"][0]) if error["loc"] else "?"
    if error["type"] == "extra_forbidden":
        return f"{origin}: unknown option {name!r}"
    if name in fields() and "sections" in extra(name):
        return f"{origin}: {name} must be {expected(name)}, got {error.get('input')!r}"
    return f"{origin}: {name}: {error['msg']}, got {error.get('input')!r}"
