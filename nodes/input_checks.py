"""Every widget value a node receives, checked against the node's own V3 schema before any work.

ComfyUI range-checks only the inputs a node's ``validate_inputs`` does not take (none at all when it
takes ``**kwargs``), never checks finiteness (NaN passes ``min <= x <= max`` tests written as two
comparisons), does not check V3 combo values, and hands linked inputs to ``validate_inputs`` as None.
So the checks are derived from the schema here, once, and run on both paths:

* ``@checked_validation`` on ``validate_inputs``: ComfyUI then passes every input (the wrapper
  declares ``**inputs``) and the schema check refuses bad direct values with HTTP 400 naming the
  input; the node's own function still receives only the parameters it declares.
* ``@checked_execution`` on ``execute``: the same check on the values that really arrive, linked
  ones included, before the node does anything.

A new input is covered the moment it is in the schema; tests/nodes/test_input_checks.py fails for a
node whose ``validate_inputs`` or ``execute`` lacks the decorator.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping
from numbers import Integral, Real

from comfy_api.latest import io

MAX_STRING_LENGTH = 65536  # characters: longer than any path, layer list or advanced TOML box needs
CHECKED_MARK = "_lumina_turbo_checked"


def _number_range(spec) -> str:
    return f"between {'-inf' if spec.min is None else spec.min} and {'inf' if spec.max is None else spec.max}"


def _value_error(spec, value, ranges: bool = True) -> str | None:
    """The problem with one value of one schema input, or None. ``ranges`` False checks only the
    type, finiteness and string length (not min/max, not combo options)."""
    name = spec.id
    if isinstance(spec, io.Int.Input):
        if isinstance(value, bool) or not isinstance(value, Integral):
            return f"{name} must be a whole number {_number_range(spec)}, got {value!r}"
    elif isinstance(spec, io.Float.Input):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            return f"{name} must be a finite number {_number_range(spec)}, got {value!r}"
    elif isinstance(spec, io.Combo.Input):
        if not ranges:
            return None
        options = list(spec.options or [])
        if value not in options:
            shown = options if len(options) <= 20 else f"one of the {len(options)} available choices"
            return f"{name} must be one of {shown}, got {value!r}"
        return None
    elif isinstance(spec, io.String.Input):
        if not isinstance(value, str):
            return f"{name} must be a string, got {type(value).__name__}"
        if len(value) > MAX_STRING_LENGTH:
            return f"{name} must be at most {MAX_STRING_LENGTH} characters long, got {len(value)}"
        return None
    elif isinstance(spec, io.Boolean.Input):
        if not isinstance(value, bool):
            return f"{name} must be true or false, got {value!r}"
        return None
    else:
        return None  # models, conditioning, custom types: the node checks what it gets
    if not ranges:
        return None
    if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
        if isinstance(spec, io.Int.Input):
            bounds = [f">= {spec.min}"] * (spec.min is not None) + [f"<= {spec.max}"] * (spec.max is not None)
            return f"{name} must be a whole number {' and '.join(bounds)}, got {value!r}"
        return f"{name} must be {_number_range(spec)}, got {value!r}"
    return None


def input_error(node_cls, values: Mapping, ranges: bool = True) -> str | None:
    """The first schema violation among ``values`` (input name -> value), or None.

    None values are inputs that arrive by link during validation: execute checks them. ``ranges``
    False checks types, finiteness and string lengths only (see checked_validation).
    """
    for spec in node_cls.define_schema().inputs:
        if spec.id in values and values[spec.id] is not None:
            error = _value_error(spec, values[spec.id], ranges)
            if error:
                return error
    return None


def _accepts(function, values: dict) -> dict:
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return values
    return {name: value for name, value in values.items() if name in parameters}


def checked_validation(function):
    """Decorate a node's ``validate_inputs`` (under ``@classmethod``) with the schema check.

    The wrapper declares ``**inputs`` so that ComfyUI passes every input to it (and skips its own,
    finiteness-blind range checks); the node's function still gets only the names it declares.
    """

    @functools.wraps(function)
    def wrapper(cls, **values):
        # NaN, inf, wrong types and huge strings never reach the node's own check; ranges and combos
        # are checked after it, so that its more specific message (e.g. "cfg must be >= 0", an unknown
        # file name) comes first. Node checks are cheap and bounded; execute checks everything first.
        error = input_error(cls, values, ranges=False)
        if error:
            return error
        result = function(cls, **_accepts(function, values))
        if result is not True:
            return result
        return input_error(cls, values) or True

    signature = inspect.signature(function)
    parameters = list(signature.parameters.values())
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        parameters.append(inspect.Parameter("inputs", inspect.Parameter.VAR_KEYWORD))
    # ComfyUI reads this with inspect.getfullargspec, which honours __signature__, not __wrapped__
    wrapper.__signature__ = signature.replace(parameters=parameters)
    del wrapper.__wrapped__
    setattr(wrapper, CHECKED_MARK, True)
    return wrapper


def checked_execution(function):
    """Decorate a node's ``execute`` (under ``@classmethod``): the schema check on every value that
    really arrived, linked ones included, before any work; a violation raises ValueError naming it."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(cls, *args, **kwargs):
        bound = signature.bind(cls, *args, **kwargs)
        values = {}
        for name, value in list(bound.arguments.items())[1:]:
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                values.update(value)
            else:
                values[name] = value
        error = input_error(cls, values)
        if error:
            raise ValueError(error)
        return function(cls, *args, **kwargs)

    setattr(wrapper, CHECKED_MARK, True)
    return wrapper


def is_checked(method) -> bool:
    """Whether a node's classmethod carries the schema check."""
    return bool(getattr(getattr(method, "__func__", method), CHECKED_MARK, False))
