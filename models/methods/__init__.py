"""Class-incremental methods, registered by name (see :mod:`strata.models.methods.registry`)."""

from strata.models.methods import aper, finetune, lae, ovor, simplecil  # noqa: F401  (registers the methods)
from strata.models.methods.base import Method, MethodConfig, StateError, read_state_meta
from strata.models.methods.registry import (
    UnknownMethodError,
    available_methods,
    create_method,
    method_config,
    method_entry,
)

__all__ = [
    "Method",
    "MethodConfig",
    "StateError",
    "UnknownMethodError",
    "available_methods",
    "create_method",
    "method_config",
    "method_entry",
    "read_state_meta",
]
