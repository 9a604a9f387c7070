"""Reading a backend's options from the raw `Backend` object of net-conf.json: keys case-insensitive (as Go's JSON),
wrong types refused with one line that names the backend and the option."""

from __future__ import annotations

from typing import Any

from ..subnet.config import lookup_key
from . import BackendError


def int_option(backend: dict[str, Any], name: str, key: str, default: int, low: int, high: int) -> int:
    value = lookup_key(backend, key, None)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BackendError(f"error decoding {name} backend config: {key} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise BackendError(f"error decoding {name} backend config: {key} must be from {low} to {high}, got {value}")
    return value


def bool_option(backend: dict[str, Any], name: str, key: str, default: bool = False) -> bool:
    value = lookup_key(backend, key, None)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BackendError(f"error decoding {name} backend config: {key} must be true or false, got {value!r}")
    return value
