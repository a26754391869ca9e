"""YAML and command-line values read as the types the params declare: `dvc exp run -S` writes numbers and
switches as text (`2e-4`, `true`), and YAML 1.1 reads `2e-4` as a string, so a value may come as text."""
from __future__ import annotations

import math
import types
import typing
from typing import Any, Literal

from alpaca_qlora.errors import ConfigError


def _expected(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " or ".join(map(repr, typing.get_args(annotation)))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(annotation, "a value")


def _require_finite(number: Any, key: str, value: Any) -> None:
    """nan and inf read as numbers, yet no step count, rate or fraction can be one: refuse them by name here, rather
    than as an OverflowError after the model has loaded."""
    if isinstance(number, float) and not math.isfinite(number):
        raise ConfigError(f"params: {key} = {value!r} is invalid: expected a finite number.")


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML value to the declared type; YAML 1.1 reads `2e-4` as a string, so numbers may come as text."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # e.g. auto or an integer: the first reading that fits
        for option in typing.get_args(annotation):
            try:
                return coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"params: {key} = {value!r} is invalid: expected "
                          f"{' or '.join(_expected(option) for option in typing.get_args(annotation))}.")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if True in choices and isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"  # a switch given on the command line
        if not isinstance(value, (str, bool)) or value not in choices:
            raise ConfigError(f"params: {key} = {value!r} is not one of {', '.join(map(repr, choices))}.")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"params: {key} = {value!r} must be a list of strings.")
        return tuple(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"params: {key} = {value!r} must be true or false.")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"params: {key} = {value!r} must be an integer.")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"params: {key} = {value!r} must be an integer.") from None
        _require_finite(number, key, value)
        if not isinstance(number, (int, float)) or float(number) != int(number):
            raise ConfigError(f"params: {key} = {value!r} must be an integer.")
        return int(number)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"params: {key} = {value!r} must be a number.")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"params: {key} = {value!r} must be a number (e.g. 2e-4).") from None
        _require_finite(number, key, value)
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"params: {key} = {value!r} must be a string.")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")
