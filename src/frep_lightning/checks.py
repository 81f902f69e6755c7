"""Argument checks shared by the modules and callbacks, so that every bad value is reported the same way:
the config key, the value given, and what is allowed."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any


def check_choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``key`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not valid; allowed values: {', '.join(allowed)}")


def check_int(key: str, value: Any, minimum: int) -> int:
    """``value`` as an ``int`` (numpy integers accepted, ``bool`` refused), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{key}={value!r} must be an integer >= {minimum}")
    return int(value)


def check_real(key: str, value: Any, within: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a ``float`` (numpy floats accepted, ``bool`` refused) for which ``ok`` holds;
    ``within`` says the allowed range in the message, e.g. ``"in [0, 1)"``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(float(value)):
        raise ValueError(f"{key}={value!r} must be a number {within}")
    return float(value)


def check_patterns(key: str, value: Any) -> tuple[str, ...]:
    """Module-name patterns: one string is one pattern (not its characters), else a sequence of strings."""
    patterns = (value,) if isinstance(value, str) else value
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{key}={value!r} must be a pattern or a list of patterns (strings, e.g. ['layer4.*'])")
    return tuple(patterns)
