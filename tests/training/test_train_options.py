"""training/options.py is the one definition of every trainer option: the TOML reader, its errors,
the node inputs and the docs table all follow it."""

import math

import pytest

from lumina_turbo.devtools import options_table
from lumina_turbo.training import config, options

NUMERIC = [n for n in options.toml_options() if options.fields()[n].annotation in (int, float)]


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


@pytest.mark.parametrize("name", options.toml_options())
def test_every_option_reads_from_its_section(tmp_path, name):
    field, section = options.fields()[name], options.extra(name)["sections"][0]
    choices = options.choices(name)
    if choices is not None:
        value = choices[-1]
    elif field.annotation is bool:
        value = not field.default
    elif field.annotation is str:
        value = "x"
    else:
        low, high, _ = options.bounds(name)
        value = field.annotation(high)
    if name in ("use_dynamic_shift", "train_attention", "train_ffn"):
        value = field.default  # cross-option rules refuse the other value on its own
    if name == "blocks_to_swap":
        value = 3
    if name == "bucket_step":
        value = 1024
    if name == "replay_min_entries":
        value = 8
    path = tmp_path / "c.toml"
    path.write_text(f"[{section}]\n{name} = {toml_value(value)}\n")
    assert getattr(config.load_toml(path), name) == value


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("kind", ["nan", "above", "below", "bool"])
def test_every_number_is_range_and_finiteness_checked(tmp_path, name, kind):
    field, section = options.fields()[name], options.extra(name)["sections"][0]
    low, high, _ = options.bounds(name)
    value = {"nan": "nan", "above": repr(high * 2 + 1), "below": repr(low - 1), "bool": "true"}[kind]
    if field.annotation is int and kind == "nan":
        value = "1.5"
    path = tmp_path / "c.toml"
    path.write_text(f"[{section}]\n{name} = {value}\n")
    with pytest.raises(config.ConfigError, match=rf"{name} must be {options.expected(name)}"):
        config.load_toml(path)


def test_every_number_has_both_bounds_and_finite_defaults():
    for name in NUMERIC:
        low, high, _ = options.bounds(name)
        assert low is not None and high is not None, name
        default = options.fields()[name].default
        assert math.isfinite(default) and low <= default <= high, name


def test_direct_construction_is_validated_too():
    with pytest.raises(config.ConfigError, match="network_dim must be an integer >= 1 and <= 1024, got 0"):
        options.TrainConfig(network_dim=0)
    assert options.TrainConfig(learning_rate=1).learning_rate == 1.0  # TOML integers are numbers


def test_run_identity_leaves_out_what_a_resumed_run_may_change():
    identity = config.run_identity(options.TrainConfig())
    assert "learning_rate" in identity and "loss_params" in identity and "shift" in identity
    for name in ("max_train_steps", "resume", "blocks_to_swap", "folder", "resolution", "output_name"):
        assert name not in identity


def test_advanced_box_takes_exactly_the_options_no_input_shows():
    shown = set(options.node_options(options.TRAINER)) | set(options.node_options(options.DATASET_NODE))
    box = set(options.advanced_box_options())
    assert not box & shown
    assert {"weight_decay", "snr_floor", "anchor_convention"} <= box
    assert not {"transformer", "folder", "cache_dir", "checkpoint_dir"} & box


def test_docs_table_is_current():
    assert options_table.DOC.read_text() == options_table.document(), (
        "run `.venv/bin/python -m lumina_turbo.devtools.options_table --write`"
    )


def test_node_inputs_follow_the_definitions(comfy_host):
    import nodes

    trainer = nodes.NODE_CLASS_MAPPINGS["LTLoraTrainer"].INPUT_TYPES()["required"]
    for name in options.node_options(options.TRAINER):
        kind, spec = trainer[options.widget_name(name)]
        field = options.fields()[name]
        assert spec["default"] == field.default and spec["tooltip"] == field.description, name
        if options.choices(name):
            assert tuple(kind) == options.choices(name) or tuple(spec.get("options", ())) == options.choices(
                name
            )
        elif field.annotation in (int, float):
            assert (spec["min"], spec["max"]) == options.bounds(name)[:2], name
    names = list(trainer)
    assert names.index("run_name") + 1 == names.index("checkpoint_every")  # where saved workflows expect it


def test_loss_parameters_are_bounded_too():
    with pytest.raises(config.ConfigError, match=r"lambda_l1.*<= 10000, got 1e\+300"):
        config.parse_advanced("lambda_l1 = 1e300", options.TrainConfig(), reserved=set())
