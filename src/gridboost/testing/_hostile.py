"""Hostile input for property tests: what a careless or malicious caller might pass to a public entry point.

:func:`hostile_values` is a hypothesis strategy; hypothesis is imported only when it is
called, so that ``gridboost.testing`` stays cheap for the pytest plugin that loads it in
every run. :class:`Hostile` needs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = ["EDGES", "Hostile", "hostile_values"]


class Hostile:
    """An object whose ``str``, truth and comparisons raise, as a careless or malicious caller might pass.

    Its ``repr`` works, so that hypothesis can print a failing example with it, and it hashes
    by identity, so it can be a dict key.
    """

    def __str__(self) -> NoReturn:
        raise RuntimeError("a hostile value: no str")

    def __bool__(self) -> NoReturn:
        raise RuntimeError("a hostile value: no truth")

    def __eq__(self, other: object) -> NoReturn:
        raise RuntimeError("a hostile value: no eq")

    def __lt__(self, other: object) -> NoReturn:
        raise RuntimeError("a hostile value: no order")

    __hash__ = object.__hash__


#: Values that broke argument checks somewhere: numbers beyond a float, nan and the infinities,
#: the tiniest and largest floats, empty, blank, NUL and very long text. (``10**5000`` is not here:
#: it has no ``repr``, which hypothesis needs; draw it as ``st.builds(pow, st.just(10), st.just(5000))``.)
EDGES: tuple[object, ...] = (
    *(10**400, -(10**400), 2**63, -1, 0, 1),
    *(math.nan, math.inf, -math.inf, 1e-320, 5e-324, 1e308, -0.0),
    *("", " ", "\0", "x" * 10_000),
)


def hostile_values(edges: Iterable[object] = (), *, also: Iterable[SearchStrategy[Any]] = ()) -> SearchStrategy[Any]:
    """Values of every kind a caller could pass by mistake, extremes included, alone or nested in lists and dicts.

    Scalars of every built-in kind; extremes (ints beyond a float, nan, the infinities, the
    tiniest floats, ``-0.0``, empty, blank, NUL and very long text); your own ``edges``
    (look-alikes your API parses: ``"cpu=-1"``, ``"tcp://h:99999"``); bare objects,
    :class:`Hostile` ones, whatever the strategies in ``also`` draw; and lists and dicts of
    them, whose keys may be hostile too. (An int with no ``repr``, ``10**5000``, cannot be an
    edge: hypothesis prints its strategies. Draw one through ``also``, as
    ``st.builds(pow, st.just(10), st.just(5000))``.) ::

        @given(value=hostile_values(["auto", "4GiB"]))
        def test_option(value):
            try:
                Grid("mine", option=value)
            except gb.InvalidRequest as exc:
                assert "\\n" not in str(exc)
    """
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=30),
        st.binary(max_size=10),
        st.sampled_from([*EDGES, *edges]),
        st.builds(object),
        st.builds(Hostile),
        *also,
    )
    keys = st.one_of(st.text(max_size=8), st.integers(), st.none(), st.floats(), st.builds(Hostile))
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)),
        max_leaves=6,
    )
