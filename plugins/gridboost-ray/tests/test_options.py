"""Every ``RayBackend`` option, whatever its value: accepted, or refused at construction with a typed one-line error.

Construction only: no Ray is started or joined, so hundreds of values cost a second.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from gridboost_ray import RayBackend
from hypothesis import given, settings
from hypothesis import strategies as st

import gridboost as gb
from gridboost.exceptions import InvalidRequest
from gridboost.testing import hostile_values

# Whatever a caller might pass (wrong types, huge and negative ints, nan and infinities, text with NUL bytes, hostile
# objects, nesting), and look-alikes of what the options parse: addresses, ports, paths.
ANYTHING = hostile_values(
    ["localhost:0", "host:99999", "host:\u00b2", "host:" + "9" * 5000],
    also=[st.builds(Path, st.text(max_size=20)), st.builds(pow, st.just(10), st.just(5000))],  # 10**5000: no repr
)
OPTIONS = (
    "address",
    "namespace",
    "runtime_env",
    "num_cpus",
    "num_gpus",
    "temp_dir",
    "connect_timeout",
    "grace",
    "cancel_grace",
    "close_timeout",
    "linger",
    "lease_grace",
    "preempt_grace",
    "grow",
)


def check(make: Any, options: dict[str, Any]) -> None:
    try:
        make(**options)
    except InvalidRequest as exc:
        message = str(exc)
        assert len(message) < 200 and "\n" not in message, message


@pytest.mark.parametrize("option", OPTIONS)
@settings(deadline=None, max_examples=60)
@given(value=ANYTHING)
def test_any_value_of_an_option_is_accepted_or_refused_with_a_short_typed_error(option: str, value: Any) -> None:
    """``RayBackend(option=value)`` and ``Grid("ray", option=value)`` succeed or raise ``InvalidRequest`` in one
    short line, whatever the value."""
    check(RayBackend, {option: value})
    check(lambda **options: gb.Grid("ray", **options), {option: value})


@settings(deadline=None, max_examples=60)
@given(options=st.dictionaries(st.sampled_from(OPTIONS), ANYTHING, max_size=4))
def test_any_mix_of_options_is_accepted_or_refused_with_a_short_typed_error(options: dict[str, Any]) -> None:
    """Several options at once, each of any value: success, or ``InvalidRequest`` in one short line."""
    check(RayBackend, options)


BAD = [
    ("linger", 10**400),
    ("linger", -(10**400)),
    ("linger", math.nan),
    ("linger", "2"),
    ("linger", True),
    ("num_cpus", 10**400),
    ("num_cpus", math.inf),
    ("grace", 10**5000),
    ("cancel_grace", -0.1),
    ("cancel_grace", math.inf),
    ("cancel_grace", "0.5"),
    ("close_timeout", -1),
    ("lease_grace", math.nan),
    ("preempt_grace", -1),
    ("preempt_grace", math.inf),
    ("preempt_grace", "10"),
    ("temp_dir", 3),
    ("temp_dir", "a\0b"),
    ("address", "host:" + "9" * 5000),
    ("address", 10**5000),
    ("namespace", ""),
    ("grow", 1),
]


# Ids by position: pytest would str() the values, and Python refuses to for an int of 5000 digits.
@pytest.mark.parametrize(("option", "value"), BAD, ids=[f"{option}-{i}" for i, (option, _) in enumerate(BAD)])
def test_a_bad_option_is_refused_at_construction_naming_it(option: str, value: Any) -> None:
    """Each bad value is refused by the constructor, with the option's name in a one-line message."""
    with pytest.raises(InvalidRequest) as caught:
        RayBackend(**{option: value})
    message = str(caught.value)
    assert option.split("_")[0] in message and len(message) < 200 and "\n" not in message


def test_cancel_grace_is_one_of_the_backends_documented_options() -> None:
    """``cancel_grace`` is accepted (0 included: force at once) and listed with the Ray backend's options."""
    from gridboost_ray._backend import _OPTIONS

    RayBackend(cancel_grace=0)
    RayBackend(cancel_grace=0.25)
    assert "cancel_grace" in _OPTIONS and "grace" in _OPTIONS


def test_preempt_grace_is_checked_at_the_boundary_and_documented() -> None:
    """``preempt_grace`` is accepted (0 included: at once), written into every lease record, and listed."""
    from gridboost_ray._backend import _OPTIONS

    assert RayBackend(preempt_grace=0)._registry.preempt_grace == 0
    assert RayBackend()._registry.preempt_grace == 10
    assert "preempt_grace" in _OPTIONS
