"""Argument checks shared by the modules and callbacks, so that every bad value is reported the same way:
the config key, the value given, and what is allowed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def check_choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``key`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not valid; allowed values: {', '.join(allowed)}")
