"""Training configuration: the AC-RF trainer's TOML sections and key names, validated, as one TrainConfig.

Sections and keys follow the public AC-RF trainer's config/acrf_config.toml, so a user's file mostly
reads unchanged: ``[model]``, ``[acrf]``, ``[lora]``, ``[training]``, ``[advanced]``, ``[dataset]``
(+ ``[[dataset.sources]]``) and ``[loss]`` for the loss-mode parameters (also accepted in
``[training]``, where AC-RF puts them). The options themselves are defined in training/options.py;
an unknown section or key is an error that names it, so a typo never silently trains with a default.

Time convention: sigmas are ComfyUI sigmas (1 = noise, 0 = data); Lumina t = 1 - sigma.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from pydantic import ValidationError

from ..losses import LOSS_MODES
from . import options
from .options import (  # noqa: F401 - re-exported: the names callers know the config by
    ANCHOR_CONVENTIONS,
    LR_SCHEDULERS,
    OPTIMIZERS,
    PRECISIONS,
    SAVE_DTYPES,
    STYLE_BASES,
    SYSTEM_PROMPTS,
    WEIGHT_DTYPES,
    ConfigError,
    TrainConfig,
)

try:  # Python 3.11+; 3.10 needs the tomli backport
    import tomllib
except ImportError:  # pragma: no cover - depends on the Python version
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

CHECKPOINT_FORMAT = "lumina_turbo.train_checkpoint"
DATASET_SECTION = options.DATASET
SECTIONS = options.SECTIONS
LOSS_PARAM_NAMES = sorted({name for params in LOSS_MODES.values() for name in params})
# AC-RF's switches, translated into loss_mode / timestep_method.
SWITCHES = {
    "enable_turbo": (options.ACRF,),
    "enable_freq": (options.TRAINING, options.LOSS),
    "enable_style": (options.TRAINING, options.LOSS),
}
# AC-RF's spellings of our names.
ALIASES = {
    "dit": "transformer",
    "lambda_cosine": "lambda_cos",
    "lambda_curvature": "curvature_weight",
    "bucket_reso_steps": "bucket_step",
    "drop_text_ratio": "caption_dropout_rate",
    "save_every_n_step": "save_every_n_steps",
}
ALIAS_SECTIONS = {
    "dit": (options.MODEL,),
    "lambda_curvature": (options.ACRF, options.TRAINING),
    "drop_text_ratio": (options.TRAINING, options.DATASET),
}
SOURCE_KEYS = {"folder", "num_repeats"}

log = logging.getLogger("lumina_turbo.training")


def _key_sections() -> dict[str, tuple[str, ...]]:
    sections = {name: options.extra(name)["sections"] for name in options.toml_options()}
    sections.update(SWITCHES)
    sections.update({name: (options.TRAINING, options.LOSS) for name in LOSS_PARAM_NAMES})
    return sections


KEY_SECTIONS = _key_sections()


def _sections_of(key: str) -> tuple[str, ...]:
    if key in ALIAS_SECTIONS:
        return ALIAS_SECTIONS[key]
    return KEY_SECTIONS[ALIASES.get(key, key)]


def known_key(key: str) -> bool:
    return ALIASES.get(key, key) in KEY_SECTIONS


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
            f"(see training/options.py or the README for every key)"
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
    values = (base or TrainConfig()).model_dump()
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
    try:
        config = TrainConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(options.describe_errors(exc, origin)) from None
    return validate(config, origin)


def _need_toml():
    if tomllib is None:
        raise ConfigError("reading TOML needs Python 3.11+ or the tomli package (pip install tomli)")


def load_toml(path, base: TrainConfig | None = None) -> TrainConfig:
    """Read a TOML config file (AC-RF's sections) into a validated TrainConfig."""
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


def _drop_inactive_loss_params(config: TrainConfig, origin: str) -> None:
    """Parameters of another loss mode (AC-RF's files keep ``alpha_hf`` etc. next to ``enable_freq =
    false``) are checked, then left out with a warning; a name no mode knows stays an error."""
    used = LOSS_MODES[config.loss_mode]
    inactive = sorted(name for name in config.loss_params if name in LOSS_PARAM_NAMES and name not in used)
    if not inactive:
        return
    for name in inactive:
        value = config.loss_params[name]
        if not math.isfinite(value) or value < 0:
            _fail(origin, name, "a finite number >= 0", value)
    log.warning(
        "lumina_turbo: %s: %s not used by loss_mode %r (inactive, ignored)",
        origin,
        ", ".join(inactive),
        config.loss_mode,
    )
    config.loss_params = {k: v for k, v in config.loss_params.items() if k not in inactive}


def validate(config: TrainConfig, origin: str = "config") -> TrainConfig:
    """The rules between options (each option's own type and range are checked by TrainConfig);
    raises ConfigError naming the first broken one."""
    from ..losses import resolve_loss_params

    if config.use_dynamic_shift:
        raise ConfigError(
            f"{origin}: use_dynamic_shift = true is not supported: Z-Image-Turbo samples with a static shift "
            "(3.0), and AC-RF's dynamic shift passed mu where exp(mu) belongs. Set shift instead."
        )
    if config.replay_min_entries > config.replay_capacity:
        _fail(
            origin,
            "replay_min_entries",
            f"<= replay_capacity ({config.replay_capacity})",
            config.replay_min_entries,
        )
    if not (config.train_attention or config.train_ffn or config.train_adaln):
        raise ConfigError(
            f"{origin}: train_attention, train_ffn and train_adaln are all false: no layer to train"
        )
    _drop_inactive_loss_params(config, origin)
    try:
        resolve_loss_params(config.loss_mode, config.loss_params)
    except ValueError as exc:
        raise ConfigError(f"{origin}: {exc}") from exc
    if config.blocks_to_swap and not config.gradient_checkpointing:
        raise ConfigError(
            f"{origin}: blocks_to_swap needs gradient_checkpointing = true (without it every streamed weight "
            "would be kept on the GPU for the backward pass, which defeats the swapping)"
        )
    if config.bucket_step % 16:
        _fail(origin, "bucket_step", "a multiple of 16 (VAE 8 x patch 2)", config.bucket_step)
    for source in config.sources:
        repeats = source.get("num_repeats", 1)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or not 1 <= repeats <= 10000:
            _fail(origin, "[[dataset.sources]] num_repeats", "an integer >= 1 and <= 10000", repeats)
    return config


def run_identity(config: TrainConfig) -> dict[str, Any]:
    """The fields a resumed run must share with its checkpoint (everything that shapes the trajectory)."""
    values = config.model_dump(include=set(options.identity_options()))
    return dict(sorted(values.items()))
