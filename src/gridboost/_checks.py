"""Argument checks, all in one place: each turns a value into what the API needs or raises a typed
error whose one-line message names the argument and quotes the value (through :func:`shown`).
"""

from __future__ import annotations

import math

from ._text import shown
from .exceptions import InvalidRequest

__all__ = ["bounded", "finite", "flag", "optional_seconds", "seconds", "text", "unit_fraction", "whole"]


def finite(value: object) -> float | None:
    """``value`` as a float if it is a real number (not a bool) that a float holds finitely, else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond a float's range is as unusable as inf
        return None
    return None if math.isnan(number) or math.isinf(number) else number


def seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    """``value`` as a finite number of seconds, > 0 (or >= 0 with ``allow_zero``); else ``InvalidRequest``."""
    number = finite(value)
    if number is None:
        raise InvalidRequest(f"{name} must be a finite number of seconds, got {shown(value)}")
    if number < 0 or (number == 0 and not allow_zero):
        raise InvalidRequest(f"{name} must be {'>= 0' if allow_zero else '> 0'} seconds, got {shown(value)}")
    return number


def optional_seconds(name: str, value: object) -> float | None:
    """``None``, or ``value`` as a finite number of seconds > 0; else an ``InvalidRequest`` naming ``name``."""
    if value is None:
        return None
    number = finite(value)
    if number is None or not number > 0:
        raise InvalidRequest(f"{name} must be a finite number of seconds > 0 or None, got {shown(value)}")
    return number


def bounded(name: str, value: object, unit: str, most: float) -> float:
    """``value`` as a float in 0..``most``; else an ``InvalidRequest`` naming ``name``."""
    number = finite(value)
    if number is None or not 0 <= number <= most:
        raise InvalidRequest(f"{name} must be a finite number ({unit}) within 0..{most:g}, got {shown(value)}")
    return number


def unit_fraction(name: str, value: object) -> float | None:
    """``value`` as a fraction in 0..1, or ``None`` (unknown); else an ``InvalidRequest`` naming ``name``."""
    if value is None:
        return None
    number = finite(value)
    if number is None or not 0 <= number <= 1:
        raise InvalidRequest(f"{name} must be a fraction within 0..1 (one scale everywhere), got {shown(value)}")
    return number


def whole(name: str, value: object, least: int = 0, error: type[Exception] = InvalidRequest) -> int:
    """``value`` as an int (not a bool) >= ``least``; else ``error`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise error(f"{name} must be a whole number >= {least}, got {shown(value)}")
    return value


def flag(name: str, value: object) -> bool:
    """``value`` if it is ``True`` or ``False``; else an ``InvalidRequest`` naming ``name``."""
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be True or False, got {shown(value)}")
    return value


def tenant(value: object) -> str:
    """A tenant's name: a short string of printable characters without spaces; else an ``InvalidRequest``."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > 100
        or not value.isprintable()
        or value != "".join(value.split())
    ):
        raise InvalidRequest(f"tenant is a short name without spaces (at most 100 characters), got {shown(value)}")
    return value


def text(name: str, value: object) -> str:
    """``value`` if it is a non-empty string; else an ``InvalidRequest`` naming ``name``."""
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{name} is a non-empty string, got {shown(value)}")
    return value
