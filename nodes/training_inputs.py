"""Node inputs generated from the trainer's option definitions (training/options.py): type, default,
bounds, choices and tooltip come from there, so the nodes and the TOML never disagree."""

from __future__ import annotations

from comfy_api.latest import io

from ..training import options


def option_input(name: str):
    """The V3 input of one option, named as the node shows it."""
    field = options.fields()[name]
    widget, tooltip, default = options.widget_name(name), field.description, field.default
    choices = options.choices(name)
    if choices is not None:
        return io.Combo.Input(widget, options=list(choices), default=default, tooltip=tooltip)
    if field.annotation is bool:
        return io.Boolean.Input(widget, default=default, tooltip=tooltip)
    low, high, _ = options.bounds(name)
    step = options.extra(name).get("step")
    kind = io.Int if field.annotation is int else io.Float
    extra = {"step": step} if step is not None else {}
    return kind.Input(widget, default=default, min=low, max=high, tooltip=tooltip, **extra)


def node_inputs(node: str) -> list:
    """Every option shown on ``node``, in declaration order."""
    return [option_input(name) for name in options.node_options(node)]


def config_values(node: str, widgets: dict) -> dict:
    """{input name: value} of ``node`` -> {option name: value} (inputs that are not options are left out)."""
    by_widget = {options.widget_name(name): name for name in options.node_options(node)}
    return {by_widget[key]: value for key, value in widgets.items() if key in by_widget}
