"""``Resources``: immutable, validated amounts of compute."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from attrs import field, frozen

from ._text import did_you_mean, shown
from .exceptions import InvalidResources

__all__ = ["Resources"]

_BUILTIN = ("cpu", "gpu", "memory", "gpu_memory")
_BYTE_FIELDS = frozenset({"memory", "gpu_memory"})
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
# The number grammar is bounded: an exponent of any length would have Fraction build 10**N
# exactly (cpu=1e10000000 burns a core for minutes). Three exponent digits reach far past
# a float's range, and no amount needs more than _MAX_DIGITS significant digits.
_DISPLAY_UNITS = sorted(
    ((unit.upper().replace("I", "i"), size) for unit, size in _UNITS.items() if size > 1), key=lambda u: -u[1]
)
_AMOUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]{1,3})?)\s*([A-Za-z]*)\s*$")
_MAX_DIGITS = 40
_EMPTY = "nothing"  # how an empty amount prints, and parses back
_CUSTOM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]*$")
# Words people write for a built-in. A name given where custom ones are implied (parse, a flat
# mapping) that is one of these or close to a built-in is a typo, not a new custom resource;
# `custom={...}` takes any valid name as it is.
_ALIASES = {"cpus": "cpu", "cores": "cpu", "gpus": "gpu", "mem": "memory", "ram": "memory", "vram": "gpu_memory"}


def _label(name: str, most: int = 40) -> str:
    """A resource's name as an error message gives it: cut short, so that a hostile name keeps the message one line."""
    return name if len(name) <= most else name[: most - 1] + "\u2026"


def _not_a_typo(name: str) -> None:
    hint = did_you_mean(name, _BUILTIN, _ALIASES)
    if hint:
        raise InvalidResources(f"unknown resource {shown(name, 40)}{hint} (to mean a custom one, use custom={{...}})")


def _amount(name: str, value: object) -> float:
    # bool is an int to Python, but cpu=True is a bug, not one core.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidResources(f"{_label(name)} must be a number, got {shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float is as unusable as inf
        raise InvalidResources(f"{_label(name)} must be finite, got {shown(value)}") from None
    if math.isnan(number) or math.isinf(number):
        raise InvalidResources(f"{_label(name)} must be finite, got {shown(value)}")
    if number < 0:
        raise InvalidResources(f"{_label(name)} must not be negative, got {shown(value)}")
    return number


def _bytes(name: str, value: object) -> int:
    # Engines count memory in whole bytes; round a fractional request up, never down.
    # Whole numbers stay exact: a float has only 53 bits.
    number = _amount(name, value)
    if isinstance(value, int):
        return value
    return math.ceil(number)


def _cpu(value: object) -> float:
    return _amount("cpu", value)


def _gpu(value: object) -> float:
    return _amount("gpu", value)


def _memory(value: object) -> int:
    return _bytes("memory", value)


def _gpu_memory(value: object) -> int:
    return _bytes("gpu_memory", value)


def _custom(value: Mapping[str, Any] | None) -> Mapping[str, float]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise InvalidResources(f"custom must be a mapping of name to amount, got {shown(value)}")
    clean: dict[str, float] = {}
    for key in value:
        if not isinstance(key, str):
            raise InvalidResources(f"custom resource name {shown(key)} is not a valid name")
    for key in sorted(value):
        if not _CUSTOM_NAME.match(key) or key in _BUILTIN:
            raise InvalidResources(f"custom resource name {shown(key)} is not a valid name")
        amount = _amount(f"custom[{shown(key)}]", value[key])
        if amount:  # zero entries say nothing; dropping them keeps equality honest
            clean[key] = amount
    return MappingProxyType(clean)


def _settle(x: float) -> float:
    # 0.1 + 0.2 - 0.3 is -5e-17, not a debt: round float noise to zero.
    return 0.0 if abs(x) < 1e-9 else x


def _format_bytes(n: int) -> str:
    # Exact, so it parses back: the largest unit, binary or decimal, that divides it ("8GB" stays 8GB).
    for unit, size in _DISPLAY_UNITS:
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _readable_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}".replace(".0 ", " ")
    return f"{n:.0f} B"


def _format_number(x: float) -> str:
    return str(int(x)) if x.is_integer() else repr(x)


@frozen(eq=False)
class Resources:
    """Amounts of compute: cores, devices, bytes and named custom counters.

    Every amount is finite and non-negative; anything else raises
    :class:`~gridboost.exceptions.InvalidResources` naming the field and the value.

    >>> Resources(cpu=2) + Resources(cpu=1, memory=2**30)
    Resources(cpu=3, memory=1GiB)
    >>> Resources(cpu=1) <= Resources(cpu=4, gpu=1)
    True
    """

    cpu: float = field(default=0, converter=_cpu)
    gpu: float = field(default=0, converter=_gpu)
    memory: int = field(default=0, converter=_memory)
    gpu_memory: int = field(default=0, converter=_gpu_memory)
    custom: Mapping[str, float] = field(factory=dict, converter=_custom)

    def __reduce__(self) -> tuple[Any, ...]:  # ``custom`` is read-only (a mappingproxy), which pickle cannot copy
        return (Resources, (self.cpu, self.gpu, self.memory, self.gpu_memory, dict(self.custom)))

    @classmethod
    def parse(cls, text: str) -> Resources:
        """Read ``"cpu=4,gpu=1,memory=8GiB"``; names other than the built-ins are custom.

        >>> Resources.parse("cpu=0.5, memory=512MiB, accel=2")
        Resources(cpu=0.5, memory=512MiB, custom={'accel': 2})
        """
        if not isinstance(text, str):
            raise InvalidResources(f"Resources.parse takes a string, got {shown(text)}")
        values: dict[str, Any] = {}
        custom: dict[str, float] = {}
        if text.strip() == _EMPTY:
            return cls()
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, raw = part.partition("=")
            name = name.strip()
            if not sep or not name:
                raise InvalidResources(f"expected name=amount, got {shown(part)}")
            if name not in _BUILTIN:
                _not_a_typo(name)  # before the amount: "mem=8GiB" is a typo, not a custom amount with a unit
            if name in values or name in custom:
                raise InvalidResources(f"{_label(name)} is given twice in {shown(text)}")
            raw = raw.strip()
            if raw.startswith("-"):
                raise InvalidResources(f"{_label(name)} must not be negative, got {shown(raw)}")
            match = _AMOUNT.match(raw) if len(raw) <= _MAX_DIGITS + 16 else None
            if match is None:
                raise InvalidResources(
                    f"{_label(name)} must be a plain number (at most {_MAX_DIGITS} digits, 3 in an exponent), "
                    f"got {shown(raw)}"
                )
            # Exact arithmetic: 1.07GB is 1070000000 bytes, not float noise rounded up.
            from fractions import Fraction  # Resources.parse only

            exact, unit = Fraction(match.group(1)), match.group(2).lower()
            if unit and name not in _BYTE_FIELDS:
                raise InvalidResources(f"{_label(name)} takes no unit, got {shown(raw)}")
            if unit not in _UNITS:
                raise InvalidResources(
                    f"{_label(name)} has an unknown unit {shown(match.group(2))}; use B, KB..TB or KiB..TiB"
                )
            exact *= _UNITS[unit]
            try:
                number: float = math.ceil(exact) if name in _BYTE_FIELDS else float(exact)
            except OverflowError:
                raise InvalidResources(f"{_label(name)} must be finite, got {shown(raw)}") from None
            if name in _BUILTIN:
                values[name] = number
            else:
                custom[name] = number
        return cls(**values, custom=custom)

    @classmethod
    def coerce(cls, value: Resources | str | Mapping[str, Any] | None) -> Resources:
        """Accept what the public API accepts: ``Resources``, a string, a mapping or ``None``."""
        if value is None:
            return _ZERO
        if isinstance(value, Resources):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, Mapping):
            for key in value:
                if not isinstance(key, str):  # before any comparison: a key's own __eq__ may raise
                    raise InvalidResources(f"resource names are strings, got {shown(key)}")
            known = {k: v for k, v in value.items() if k in _BUILTIN}
            extra = {k: v for k, v in value.items() if k not in _BUILTIN and k != "custom"}
            for key in extra:
                _not_a_typo(key)
            nested = value.get("custom")
            if nested is None:
                nested = {}
            if not isinstance(nested, Mapping):
                raise InvalidResources(f"custom must be a mapping of name to amount, got {shown(nested)}")
            return cls(**known, custom={**nested, **extra})
        raise InvalidResources(f"resources must be Resources, a string or a mapping, got {shown(value)}")

    def _items(self) -> Iterator[tuple[str, float]]:
        yield "cpu", self.cpu
        yield "gpu", self.gpu
        yield "memory", self.memory
        yield "gpu_memory", self.gpu_memory
        yield from self.custom.items()

    def as_dict(self) -> dict[str, float]:
        """The non-zero amounts, custom ones flattened in: ``{"cpu": 4.0, "accel": 1.0}``."""
        return {k: v for k, v in self._items() if v}

    def __bool__(self) -> bool:
        return bool(self.cpu or self.gpu or self.memory or self.gpu_memory or self.custom)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Resources):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        # Hashed on every Ray submission (its options are cached by the task's resources): the common case without
        # custom amounts hashes the four numbers, zeros included, which equal Resources share as __eq__ requires.
        if not self.custom:
            return hash((self.cpu, self.gpu, self.memory, self.gpu_memory))
        return hash(tuple(sorted(self.as_dict().items())))

    def _combine(self, other: Resources, sign: int) -> Resources:
        if not isinstance(other, Resources):
            return NotImplemented
        custom = dict(self.custom)
        for key, amount in other.custom.items():
            custom[key] = _settle(custom.get(key, 0) + sign * amount)
        return Resources(
            cpu=_settle(self.cpu + sign * other.cpu),
            gpu=_settle(self.gpu + sign * other.gpu),
            memory=self.memory + sign * other.memory,
            gpu_memory=self.gpu_memory + sign * other.gpu_memory,
            custom=custom,
        )

    def __add__(self, other: Resources) -> Resources:
        return self._combine(other, 1)

    def __sub__(self, other: Resources) -> Resources:
        """Subtract; a negative result raises, because it means more was taken than held."""
        return self._combine(other, -1)

    def __mul__(self, factor: float) -> Resources:
        factor = _amount("factor", factor)
        return Resources(
            cpu=self.cpu * factor,
            gpu=self.gpu * factor,
            memory=self.memory * factor,
            gpu_memory=self.gpu_memory * factor,
            custom={k: v * factor for k, v in self.custom.items()},
        )

    __rmul__ = __mul__

    def fits_in(self, other: Resources) -> bool:
        """Whether every amount here is at most the same amount in ``other``."""
        theirs = other.as_dict()
        # Tolerate float noise from repeated + and - of fractional amounts.
        return all(v <= theirs.get(k, 0) + 1e-9 for k, v in self._items() if v)

    def __le__(self, other: Resources) -> bool:
        if not isinstance(other, Resources):
            return NotImplemented
        return self.fits_in(other)

    def __ge__(self, other: Resources) -> bool:
        if not isinstance(other, Resources):
            return NotImplemented
        return other.fits_in(self)

    def shortfall(self, available: Resources) -> Resources:
        """What ``available`` lacks to hold this request (zero when it fits)."""
        theirs = available.as_dict()
        missing = {k: v - theirs.get(k, 0) for k, v in self._items() if v > theirs.get(k, 0) + 1e-9}
        return Resources.coerce(missing)

    def capped(self, limit: Resources) -> Resources:
        """Each amount, but no more than the same amount in ``limit``."""
        theirs = limit.as_dict()
        return Resources.coerce({k: min(v, theirs.get(k, 0)) for k, v in self._items() if v})

    def human(self) -> str:
        """For people: ``cpu=4, memory=23.5 GiB``, memory rounded in binary units (``str`` is exact, for parsing).

        >>> Resources.parse("cpu=4,memory=25232000000").human()
        'cpu=4, memory=23.5 GiB'
        """
        parts = []
        for key, value in self._items():
            if value:
                parts.append(f"{key}={_readable_bytes(value) if key in _BYTE_FIELDS else _format_number(value)}")
        return ", ".join(parts) or _EMPTY

    def __str__(self) -> str:
        parts = []
        for key, value in self._items():
            if not value:
                continue
            text = _format_bytes(int(value)) if key in _BYTE_FIELDS else _format_number(value)
            parts.append(f"{key}={text}")
        return ",".join(parts) or _EMPTY

    def __repr__(self) -> str:
        fields = []
        for key in _BUILTIN:
            value = getattr(self, key)
            if value:
                text = _format_bytes(value) if key in _BYTE_FIELDS else _format_number(value)
                fields.append(f"{key}={text}")
        if self.custom:
            custom = {k: (int(v) if v.is_integer() else v) for k, v in self.custom.items()}
            fields.append(f"custom={custom!r}")
        return f"Resources({', '.join(fields)})"


_ZERO = Resources()

# For texts about amounts built without making a Resources (the placement hot path).
BYTE_FIELDS = _BYTE_FIELDS
format_bytes = _format_bytes
format_number = _format_number
