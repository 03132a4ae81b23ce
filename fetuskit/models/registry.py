"""The model registry: every network is built by name from a typed dataclass config.

A family registers a builder with :func:`register_model`. Builders take the config and a
``load_weights`` flag: :func:`build_model` passes ``True`` so that pretrained encoder weights
named in the config are loaded after construction, while checkpoint loading passes ``False``
because the checkpoint supplies every weight.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

Builder = Callable[[Any, bool], nn.Module]


class UnknownModelError(KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:
        return str(self.args[0])


class ModelConfigError(ValueError):
    """A model config with unknown keys or values of the wrong type."""


@dataclass(frozen=True)
class _Entry:
    builder: Builder
    config_class: type
    tiny_config: dict[str, Any]


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, config_class: type, *, tiny_config: Mapping[str, Any]) -> Callable[[Builder], Builder]:
    """Register ``builder(config, load_weights) -> nn.Module`` under ``name``.

    ``tiny_config`` contains the overrides of a small variant that builds and runs in well under a
    second on a CPU; tests use it for every registered model.
    """
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"config class {config_class!r} of model {name!r} must be a dataclass")

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered; pick another name")
        config_from_dict(config_class, dict(tiny_config), model_name=name)
        _REGISTRY[name] = _Entry(builder, config_class, dict(tiny_config))
        return builder

    return decorator


def registered_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; registered models: {', '.join(registered_models())}"
        ) from None


def model_config_class(name: str) -> type:
    """Return the dataclass that configures model ``name``."""
    return _entry(name).config_class


def tiny_config(name: str) -> dict[str, Any]:
    """Return the config overrides of the small test variant of model ``name``."""
    return dict(_entry(name).tiny_config)


def config_from_dict(config_class: type, values: Mapping[str, Any], *, model_name: str = "") -> Any:
    """Build ``config_class(**values)``, rejecting unknown keys and turning lists into tuples.

    Lists are accepted for tuple-typed fields because JSON and YAML have no tuples.

    Raises:
        ModelConfigError: on keys that are not fields of ``config_class``, listing the valid ones.
    """
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - set(fields))
    label = f"model {model_name!r}" if model_name else config_class.__name__
    if unknown:
        raise ModelConfigError(
            f"unknown config keys for {label}: {unknown}; valid keys are {sorted(fields)}"
        )
    hints = typing.get_type_hints(config_class)
    converted: dict[str, Any] = {}
    wrong = []
    for key, value in values.items():
        if isinstance(value, list) and typing.get_origin(hints[key]) is tuple:
            value = tuple(value)
        if not _value_matches(value, hints[key]):
            wrong.append(f"{key}={value!r} (expected {hints[key]})")
        converted[key] = value
    if wrong:
        raise ModelConfigError(f"config values of the wrong type for {label}: {'; '.join(wrong)}")
    return config_class(**converted)


def _value_matches(value: Any, hint: Any) -> bool:
    """Return whether ``value`` fits the type hint of a config field.

    Covers the hints config dataclasses use (bool, int, float, str, None, unions, tuples, lists,
    dicts); any other hint is accepted unchecked. An int is accepted for a float, a bool is not
    accepted for a number.
    """
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_value_matches(value, argument) for argument in arguments)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return all(_value_matches(item, arguments[0]) for item in value)
        return len(arguments) == len(value) and all(map(_value_matches, value, arguments))
    if origin is list or hint is list:
        if not isinstance(value, list):
            return False
        return not arguments or all(_value_matches(item, arguments[0]) for item in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def build_model(name: str, **config: Any) -> nn.Module:
    """Build model ``name`` with the given config fields, loading any pretrained weights it names.

    Returns a module with ``.name``, ``.config`` and ``.input_size`` whose ``forward(x)`` maps
    (N, 1, H, W) float images in [0, 1] to a :class:`fetuskit.models.base.ModelOutput`.
    """
    return build_from_config(name, config, load_weights=True)


def build_from_config(name: str, config: Mapping[str, Any], *, load_weights: bool) -> nn.Module:
    """Build model ``name`` from a config mapping; see :func:`build_model`.

    ``load_weights=False`` skips the pretrained weights a config names, for callers that load a
    full checkpoint right after.
    """
    entry = _entry(name)
    parsed = config_from_dict(entry.config_class, config, model_name=name)
    model = entry.builder(parsed, load_weights)
    model.name = name
    model.config = parsed
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (total, trainable) parameter counts of ``model``."""
    total = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return total, trainable
