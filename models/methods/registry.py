"""Methods by name, like timm's model registry.

Each name maps to a method class and the config factory holding that variant's defaults, so
``aper_adapter`` and ``aper_ssf`` are one class with two configs. Aliases (``adam_*``) resolve to
the canonical name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from strata.models.backbones import Backbone
from strata.models.errors import UserError
from strata.models.methods.base import Method, MethodConfig


class UnknownMethodError(UserError, ValueError):
    """The name is not registered; the message lists the valid ones."""


@dataclass(frozen=True)
class MethodEntry:
    name: str
    method_class: type[Method]
    default_config: Callable[[], MethodConfig]
    summary: str


_REGISTRY: dict[str, MethodEntry] = {}
_ALIASES: dict[str, str] = {}


def register_method(
    name: str,
    method_class: type[Method],
    default_config: Callable[[], MethodConfig],
    summary: str,
    aliases: tuple[str, ...] = (),
) -> None:
    if name in _REGISTRY or name in _ALIASES:
        raise ValueError(f"method {name!r} is registered twice")
    _REGISTRY[name] = MethodEntry(name, method_class, default_config, summary)
    for alias in aliases:
        _ALIASES[alias] = name


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_entry(name: str) -> MethodEntry:
    canonical = _ALIASES.get(name, name)
    if canonical not in _REGISTRY:
        aliases = f" (aliases: {', '.join(sorted(_ALIASES))})" if _ALIASES else ""
        raise UnknownMethodError(f"unknown method {name!r}; choose one of {', '.join(available_methods())}{aliases}")
    return _REGISTRY[canonical]


def method_config(name: str, overrides: dict[str, Any] | None = None) -> MethodConfig:
    """The variant's default config, with nested ``overrides`` applied and validated."""
    entry = method_entry(name)
    base = entry.default_config().model_dump()
    merged = _deep_merge(base, overrides or {})
    return entry.method_class.config_class.model_validate(merged)


def create_method(
    name: str, backbone: Backbone, config: MethodConfig | None = None, overrides: dict[str, Any] | None = None
) -> Method:
    """Build a method by (possibly aliased) name on a backbone."""
    entry = method_entry(name)
    if config is None:
        config = method_config(name, overrides)
    return entry.method_class(entry.name, config, backbone)


def _deep_merge(base: dict, overrides: dict) -> dict:
    result = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _deep_merge(result[key], value)
        else:
            result[key] = value
    return result
