"""Training configuration: the seed's TOML sections and key names, validated, as one flat TrainConfig.

Sections and keys follow the public AC-RF trainer (seed 003, config/acrf_config.toml), so a user's file
mostly reads unchanged: ``[model]``, ``[acrf]``, ``[lora]``, ``[training]``, ``[advanced]``,
``[dataset]`` (+ ``[[dataset.sources]]``) and ``[loss]`` for the loss-mode parameters (also accepted
in ``[training]``, where AC-RF puts them). Every key is documented in ``FIELDS``; an unknown section
or key is an error that names it, so a typo never silently trains with a default.

Time convention: sigmas are ComfyUI sigmas (1 = noise, 0 = data); Lumina t = 1 - sigma.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from ..losses import LOSS_MODES, MIN_SNR_FORMS, TIMESTEP_METHODS
from .config_keys import (
    ALIAS_SECTIONS,
    ALIASES,
    DATASET_SECTION,
    FIELDS,
    LOSS_PARAM_NAMES,
    RUN_IDENTITY_EXCLUDED,
    SECTIONS,
    SOURCE_KEYS,
)

try:  # Python 3.11+; 3.10 needs the tomli backport
    import tomllib
except ImportError:  # pragma: no cover - depends on the Python version
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")
PRECISIONS = ("bf16", "fp32")
ANCHOR_CONVENTIONS = ("zimage", "diffusers")
STYLE_BASES = ("latent_rgb", "channels")
SYSTEM_PROMPTS = ("none", "superior", "alignment")
CHECKPOINT_FORMAT = "lumina_turbo.train_checkpoint"

log = logging.getLogger("lumina_turbo.training")


class ConfigError(ValueError):
    """A configuration value or key the trainer cannot use; the message names it."""


@dataclass
class TrainConfig:
    # [model] (headless only: the node gets MODEL/CLIP/VAE from the graph)
    transformer: str = ""
    text_encoder: str = ""
    vae: str = ""
    weight_dtype: str = "default"
    output_dir: str = ""
    output_name: str = "lumina_turbo_lora"
    save_dtype: str = "bf16"
    # [acrf] timesteps, replay, curvature
    turbo_steps: int = 10
    shift: float = 3.0
    jitter_scale: float = 0.02
    anchor_convention: str = "zimage"
    timestep_method: str = "anchor"
    sigmoid_mean: float = 0.0
    sigmoid_scale: float = 1.0
    raft_mode: bool = False
    free_stream_ratio: float = 0.3
    latent_jitter_scale: float = 0.0
    use_dynamic_shift: bool = False
    curvature_weight: float = 0.0
    curvature_interval: int = 1
    curvature_step: float = 0.0
    curvature_start_step: int = 0
    replay_ratio: float = 0.0
    replay_capacity: int = 64
    replay_min_entries: int = 8
    # [lora]
    network_dim: int = 16
    network_alpha: float = 16.0
    train_attention: bool = True
    train_ffn: bool = True
    train_refiners: bool = False
    train_adaln: bool = False
    # [training]
    optimizer_type: str = "AdamW"
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    loss_mode: str = "standard"
    loss_params: dict = field(default_factory=dict)
    style_basis: str = "latent_rgb"
    snr_gamma: float = 5.0
    snr_form: str = "rectified_flow_velocity"
    snr_floor: float = 0.1
    num_train_epochs: int = 0
    max_train_steps: int = 500
    gradient_accumulation_steps: int = 1
    seed: int = 42
    save_every_n_steps: int = 100
    resume: bool = True
    checkpoint_dir: str = ""
    # [advanced]
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    mixed_precision: str = "bf16"
    blocks_to_swap: int = 0
    # [dataset]
    folder: str = ""
    sources: list = field(default_factory=list)
    batch_size: int = 1
    shuffle: bool = True
    enable_bucket: bool = True
    resolution: int = 1024
    bucket_step: int = 64
    max_aspect_ratio: float = 4.0
    caption_dropout_rate: float = 0.0
    max_sequence_length: int = 512
    num_repeats: int = 1
    caption_extension: str = ".txt"
    cache_dir: str = ""
    system_prompt: str = "none"

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _sections_of(key: str) -> tuple[str, ...]:
    if key in ALIAS_SECTIONS:
        return ALIAS_SECTIONS[key]
    return FIELDS[ALIASES.get(key, key)][0]


def known_key(key: str) -> bool:
    return ALIASES.get(key, key) in FIELDS


def flatten_toml(document: dict, *, allow_flat: bool = False, origin: str = "config") -> dict[str, Any]:
    """A parsed TOML document -> {field name: value}; raises ConfigError naming unknown sections/keys.

    ``allow_flat``: keys may also sit at the top level (the node's ``advanced`` box).
    """
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    unknown: list[str] = []

    def put(key: str, value: Any, place: str):
        name = ALIASES.get(key, key)
        if name in flat:
            raise ConfigError(f"{origin}: {place}.{key} sets {name!r} again (first set in {where[name]})")
        flat[name], where[name] = value, f"{place}.{key}"

    for section, body in document.items():
        if isinstance(body, dict) and section in SECTIONS:
            for key, value in body.items():
                if section == DATASET_SECTION and key == "sources":
                    put("sources", _check_sources(value, origin), "[dataset]")
                elif not known_key(key) or section not in _sections_of(key):
                    unknown.append(f"[{section}] {key}")
                else:
                    put(key, value, f"[{section}]")
        elif isinstance(body, dict):
            unknown.append(f"[{section}]")
        elif allow_flat and known_key(section):
            put(section, body, "top level")
        else:
            unknown.append(section)
    if unknown:
        raise ConfigError(
            f"{origin}: unknown key(s) {', '.join(unknown)}; known sections {list(SECTIONS)} "
            f"(see training/config.py FIELDS or the README for every key)"
        )
    return flat


def _check_sources(value, origin: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ConfigError(f"{origin}: [[dataset.sources]] must be tables with keys {sorted(SOURCE_KEYS)}")
    for item in value:
        extra = sorted(set(item) - SOURCE_KEYS)
        if extra:
            hint = " (this trainer caches from the images itself)" if "cache_directory" in extra else ""
            raise ConfigError(
                f"{origin}: unknown key(s) {extra} in [[dataset.sources]]{hint}; known {sorted(SOURCE_KEYS)}"
            )
        if not isinstance(item.get("folder"), str) or not item["folder"]:
            raise ConfigError(f'{origin}: every [[dataset.sources]] needs folder = "<image folder>"')
    return [{"folder": item["folder"], "num_repeats": item.get("num_repeats", 1)} for item in value]


def config_from_flat(
    flat: dict[str, Any], base: TrainConfig | None = None, origin: str = "config"
) -> TrainConfig:
    """Apply {field: value} (after flatten_toml) on top of ``base`` and validate the result."""
    values = dataclasses.asdict(base or TrainConfig())
    flat = dict(flat)
    loss_params = dict(values["loss_params"])
    for name in LOSS_PARAM_NAMES:
        if name in flat:
            loss_params[name] = flat.pop(name)
    enable_freq, enable_style = flat.pop("enable_freq", None), flat.pop("enable_style", None)
    enable_turbo = flat.pop("enable_turbo", None)
    for name, value in flat.items():
        values[name] = value
    values["loss_params"] = loss_params
    if enable_freq is not None or enable_style is not None:
        implied = {
            (False, False): "standard",
            (True, False): "frequency",
            (False, True): "style",
            (True, True): "unified",
        }[(bool(enable_freq), bool(enable_style))]
        if "loss_mode" in flat and flat["loss_mode"] != implied:
            raise ConfigError(
                f"{origin}: loss_mode = {flat['loss_mode']!r} contradicts enable_freq/enable_style "
                f"(which mean {implied!r}); set one of them"
            )
        values["loss_mode"] = implied
    if enable_turbo is not None:
        if not enable_turbo and "timestep_method" not in flat:
            values["timestep_method"] = "uniform"
        elif enable_turbo and flat.get("timestep_method", "anchor") != "anchor":
            raise ConfigError(
                f"{origin}: enable_turbo = true contradicts timestep_method = {flat['timestep_method']!r}"
            )
    config = TrainConfig(**{k: values[k] for k in (f.name for f in dataclasses.fields(TrainConfig))})
    validate(config, origin)
    return config


def _need_toml():
    if tomllib is None:
        raise ConfigError("reading TOML needs Python 3.11+ or the tomli package (pip install tomli)")


def load_toml(path, base: TrainConfig | None = None) -> TrainConfig:
    """Read a TOML config file (the seed's sections) into a validated TrainConfig."""
    _need_toml()
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"--config: {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from exc
    return config_from_flat(flatten_toml(document, origin=str(path)), base, origin=str(path))


def parse_advanced(text: str, base: TrainConfig, reserved: set[str], origin: str = "advanced") -> TrainConfig:
    """The node's ``advanced`` box: TOML, sections optional; keys that are node widgets are refused."""
    if not text.strip():
        return base
    _need_toml()
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{origin}: not valid TOML ({exc}); write key = value lines, e.g. lambda_l1 = 0.5"
        ) from exc
    flat = flatten_toml(document, allow_flat=True, origin=origin)
    clash = sorted(set(flat) & reserved)
    if clash:
        raise ConfigError(f"{origin}: {clash} are inputs of this node; set them there, not in {origin}")
    return config_from_flat(flat, base, origin=origin)


def _fail(origin: str, name: str, expected: str, value) -> None:
    raise ConfigError(f"{origin}: {name} must be {expected}, got {value!r}")


def _int(config, origin, name, minimum, maximum=None):
    value = getattr(config, name)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        _fail(origin, name, bound, value)


def _float(config, origin, name, minimum, maximum=None, *, open_min=False):
    value = getattr(config, name)
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    ok = ok and (value > minimum if open_min else value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        low = f"> {minimum}" if open_min else f">= {minimum}"
        _fail(origin, name, f"a number {low}" + (f" and <= {maximum}" if maximum is not None else ""), value)
    setattr(config, name, float(value))


def _choice(config, origin, name, choices):
    if getattr(config, name) not in choices:
        _fail(origin, name, f"one of {list(choices)}", getattr(config, name))


def _bool(config, origin, name):
    if not isinstance(getattr(config, name), bool):
        _fail(origin, name, "true or false", getattr(config, name))


def _str(config, origin, name):
    if not isinstance(getattr(config, name), str):
        _fail(origin, name, "a string", getattr(config, name))


def _drop_inactive_loss_params(config: TrainConfig, origin: str) -> None:
    """Parameters of another loss mode (AC-RF's files keep ``alpha_hf`` etc. next to ``enable_freq =
    false``) are checked, then left out with a warning; a name no mode knows stays an error."""
    if not isinstance(config.loss_params, dict):
        _fail(origin, "loss_params", "a table of loss-mode parameters", config.loss_params)
    used = LOSS_MODES[config.loss_mode]
    inactive = sorted(name for name in config.loss_params if name in LOSS_PARAM_NAMES and name not in used)
    if not inactive:
        return
    for name in inactive:
        value = config.loss_params[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            _fail(origin, name, "a finite number >= 0", value)
    log.warning(
        "lumina_turbo: %s: %s not used by loss_mode %r (inactive, ignored)",
        origin,
        ", ".join(inactive),
        config.loss_mode,
    )
    config.loss_params = {k: v for k, v in config.loss_params.items() if k not in inactive}


def validate(config: TrainConfig, origin: str = "config") -> TrainConfig:
    """Check every field; raises ConfigError naming the first bad one. Normalises numbers to float."""
    from ..losses import resolve_loss_params

    for name in (
        "transformer",
        "text_encoder",
        "vae",
        "output_dir",
        "output_name",
        "checkpoint_dir",
        "folder",
        "caption_extension",
        "cache_dir",
    ):
        _str(config, origin, name)
    _choice(
        config,
        origin,
        "weight_dtype",
        ("default", "fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"),
    )
    _choice(config, origin, "save_dtype", ("bf16", "fp16", "fp32"))
    _int(config, origin, "turbo_steps", 1, 1000)
    _float(config, origin, "shift", 0, open_min=True)
    _float(config, origin, "jitter_scale", 0, 1)
    _choice(config, origin, "anchor_convention", ANCHOR_CONVENTIONS)
    _choice(config, origin, "timestep_method", TIMESTEP_METHODS)
    _float(config, origin, "sigmoid_mean", -10, 10)
    _float(config, origin, "sigmoid_scale", 0, 10, open_min=True)
    for name in (
        "raft_mode",
        "use_dynamic_shift",
        "train_attention",
        "train_ffn",
        "train_refiners",
        "train_adaln",
        "resume",
        "gradient_checkpointing",
        "shuffle",
        "enable_bucket",
    ):
        _bool(config, origin, name)
    if config.use_dynamic_shift:
        raise ConfigError(
            f"{origin}: use_dynamic_shift = true is not supported: Z-Image-Turbo samples with a static shift "
            "(3.0), and AC-RF's dynamic shift passed mu where exp(mu) belongs. Set shift instead."
        )
    _float(config, origin, "free_stream_ratio", 0, 1)
    _float(config, origin, "latent_jitter_scale", 0, 1)
    _float(config, origin, "curvature_weight", 0)
    _int(config, origin, "curvature_interval", 1)
    _float(config, origin, "curvature_step", 0, 0.2495)
    _int(config, origin, "curvature_start_step", 0)
    _float(config, origin, "replay_ratio", 0, 1)
    _int(config, origin, "replay_capacity", 1)
    _int(config, origin, "replay_min_entries", 1, config.replay_capacity)
    _int(config, origin, "network_dim", 1, 1024)
    _float(config, origin, "network_alpha", 0, open_min=True)
    if not (config.train_attention or config.train_ffn or config.train_adaln):
        raise ConfigError(
            f"{origin}: train_attention, train_ffn and train_adaln are all false: no layer to train"
        )
    _choice(config, origin, "optimizer_type", OPTIMIZERS)
    _float(config, origin, "learning_rate", 0, 1, open_min=True)
    _float(config, origin, "weight_decay", 0, 1)
    _choice(config, origin, "lr_scheduler", LR_SCHEDULERS)
    _int(config, origin, "lr_warmup_steps", 0)
    _int(config, origin, "lr_num_cycles", 1)
    _choice(config, origin, "loss_mode", tuple(LOSS_MODES))
    _drop_inactive_loss_params(config, origin)
    try:
        resolve_loss_params(config.loss_mode, config.loss_params)
    except ValueError as exc:
        raise ConfigError(f"{origin}: {exc}") from exc
    _choice(config, origin, "style_basis", STYLE_BASES)
    _float(config, origin, "snr_gamma", 0)
    _choice(config, origin, "snr_form", MIN_SNR_FORMS)
    _float(config, origin, "snr_floor", 0, 1)
    _int(config, origin, "num_train_epochs", 0)
    _int(config, origin, "max_train_steps", 1)
    _int(config, origin, "gradient_accumulation_steps", 1, 1024)
    _int(config, origin, "seed", 0, 2**63 - 1)
    _int(config, origin, "save_every_n_steps", 0)
    _float(config, origin, "max_grad_norm", 0)
    _choice(config, origin, "mixed_precision", PRECISIONS)
    _int(config, origin, "blocks_to_swap", 0, 1000)
    if config.blocks_to_swap and not config.gradient_checkpointing:
        raise ConfigError(
            f"{origin}: blocks_to_swap needs gradient_checkpointing = true (without it every streamed weight "
            "would be kept on the GPU for the backward pass, which defeats the swapping)"
        )
    _int(config, origin, "batch_size", 1, 256)
    _int(config, origin, "resolution", 64, 8192)
    _int(config, origin, "bucket_step", 16, 1024)
    if config.bucket_step % 16:
        _fail(origin, "bucket_step", "a multiple of 16 (VAE 8 x patch 2)", config.bucket_step)
    _float(config, origin, "max_aspect_ratio", 1)
    _float(config, origin, "caption_dropout_rate", 0, 1)
    _int(config, origin, "max_sequence_length", 1)
    _int(config, origin, "num_repeats", 1, 10000)
    _choice(config, origin, "system_prompt", SYSTEM_PROMPTS)
    for source in config.sources:
        repeats = source.get("num_repeats", 1)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            _fail(origin, "[[dataset.sources]] num_repeats", "an integer >= 1", repeats)
    return config


def run_identity(config: TrainConfig) -> dict[str, Any]:
    """The fields a resumed run must share with its checkpoint (everything that shapes the trajectory)."""
    values = dataclasses.asdict(config)
    return {k: v for k, v in sorted(values.items()) if k not in RUN_IDENTITY_EXCLUDED}
