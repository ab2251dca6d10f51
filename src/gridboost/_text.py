"""Values as error messages quote them: short, one line, and never raising, whatever the value."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["did_you_mean", "shown"]

_SHOWN = 60  # characters of a value an error message quotes: one short line, whatever the value


def shown(value: object, limit: int = _SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages: never long, never raises.

    An int of thousands of digits has no ``repr`` (Python refuses to convert it) and a
    hostile object's ``__repr__`` may raise; both are described instead.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        sign = "-" if value < 0 else ""
        return f"{sign}an integer of about {int(value.bit_length() * 0.30103)} digits"
    try:
        text = repr(value)
    except Exception:  # a __repr__ that raises (or returns a non-string, which repr turns into TypeError)
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def did_you_mean(word: str, choices: Iterable[str], aliases: Mapping[str, str] | None = None) -> str:
    """``"; did you mean 'cpu'?"`` for a likely typo of one of ``choices``, or ``""``.

    Case is ignored; ``aliases`` maps words people write for a choice (``mem``) to it.
    """
    options = list(choices)
    folded = word.casefold()
    found = [c for c in options if c.casefold() == folded] or (
        [aliases[folded]] if aliases and folded in aliases else []
    )
    if not found and len(word) <= 40:
        lowered = {c.casefold(): c for c in options}
        import difflib  # only when a name is wrong

        found = [lowered[c] for c in difflib.get_close_matches(folded, list(lowered), n=1, cutoff=0.75)]
    return f"; did you mean {found[0]!r}?" if found else ""
