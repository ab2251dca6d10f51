"""Every ``DaskBackend`` option, whatever its value: accepted, or refused at construction with a typed one-line error.

Construction only: no Dask is started or joined, so hundreds of values cost a second.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
from gridboost_dask import DaskBackend
from hypothesis import given, settings
from hypothesis import strategies as st

import gridboost as gb
from gridboost import Grid
from gridboost.testing import hostile_values

OPTIONS = set(inspect.signature(DaskBackend).parameters)
TIMEOUTS = [
    "connect_timeout",
    "start_timeout",
    "grow_timeout",
    "grace",
    "lease_grace",
    "watch_interval",
    "close_timeout",
]
COUNTS = ["n_workers", "threads_per_worker", "max_workers"]


#: Look-alikes of what the options parse, besides the edges every check meets: ports, addresses, sizes.
EDGES = [65536, "auto", "local", "4GiB", "1e999GB", "tcp://127.0.0.1:1", "tcp://h:99999", "tcp://h:" + "9" * 5000]


def anything() -> st.SearchStrategy[Any]:
    """Values of every kind an option could get by mistake, extremes included, alone or nested in lists and dicts."""
    return hostile_values(EDGES)


def _constructed(options: dict[str, Any]) -> None:
    """Build a grid and, apart, the backend with ``options``: each succeeds or raises a short InvalidRequest."""
    for build in (lambda: Grid("dask", **options), lambda: DaskBackend(**options)):
        try:
            build()
        except gb.InvalidRequest as exc:
            message = str(exc)
            assert len(message) < 200 and "\n" not in message, message


class TestOptions:
    @pytest.mark.parametrize(
        ("option", "value"),
        [
            *((name, bad) for name in TIMEOUTS for bad in (10**400, -(10**400), math.nan, math.inf, "5", True, 0, -1)),
            *((name, bad) for name in COUNTS for bad in (10**400, -(10**400), 0, 2.0, "2", True, math.nan, 10**6)),
            *(("memory_limit", bad) for bad in (10**400, -1, math.nan, "lots", "1e999GB", "9" * 5000, True, [1])),
            *(("resources", bad) for bad in ({"GPU": math.nan}, {"GPU": 10**400}, {"GPU": -1}, {1: 1}, {"x": "1"})),
            *(("address", bad) for bad in ("tcp://h:" + "9" * 5000, "tcp://h:\u0661", "h:0", "no-port", 10**400)),
            ("security", 10**400),
        ],
    )
    def test_a_bad_option_is_refused_at_construction_in_one_short_line(self, option: str, value: object) -> None:
        """Every option is checked when the grid is built: InvalidRequest naming it, one line under 200 characters."""
        for build in (lambda: Grid("dask", **{option: value}), lambda: DaskBackend(**{option: value})):
            with pytest.raises(gb.InvalidRequest, match=option) as info:
                build()
            assert len(str(info.value)) < 200 and "\n" not in str(info.value)

    @settings(max_examples=150, deadline=None)
    @given(options=st.dictionaries(st.sampled_from(sorted(OPTIONS)), anything(), max_size=3))
    def test_any_options_build_a_grid_or_raise_a_short_invalid_request(self, options: dict[str, Any]) -> None:
        """Whatever values the options get, building a grid succeeds or raises a short InvalidRequest, nothing else."""
        _constructed(options)
