"""Tests of ``Resources``: validation, equality, arithmetic, comparison, parsing and coercion."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import pytest

from gridboost import InvalidResources, Resources

GiB = 2**30
MiB = 2**20


class TestConstruction:
    def test_defaults_are_zero_and_falsy(self) -> None:
        """A Resources with no arguments holds nothing at all and is falsy."""
        nothing = Resources()

        assert (nothing.cpu, nothing.gpu, nothing.memory, nothing.gpu_memory) == (0, 0, 0, 0)
        assert dict(nothing.custom) == {}
        assert not nothing
        assert nothing.as_dict() == {}

    @pytest.mark.parametrize(
        "resources",
        [
            Resources(cpu=0.5),
            Resources(gpu=1),
            Resources(memory=1),
            Resources(gpu_memory=1),
            Resources(custom={"a": 1}),
        ],
        ids=["cpu", "gpu", "memory", "gpu_memory", "custom"],
    )
    def test_any_nonzero_amount_is_truthy(self, resources: Resources) -> None:
        """One non-zero amount in any dimension makes a Resources truthy."""
        assert resources

    def test_int_and_float_are_equal_and_hash_alike(self) -> None:
        """Resources(cpu=1) equals Resources(cpu=1.0) and hashes the same, so sets and dicts agree."""
        a, b = Resources(cpu=1, gpu=2), Resources(cpu=1.0, gpu=2.0)

        assert a == b
        assert hash(a) == hash(b)
        assert len({a, b}) == 1

    def test_zero_custom_entries_are_dropped(self) -> None:
        """A custom amount of zero is dropped, so it changes neither equality nor hash."""
        with_zero = Resources(cpu=1, custom={"accel": 0, "licence": 2})
        without = Resources(cpu=1, custom={"licence": 2})

        assert dict(with_zero.custom) == {"licence": 2}
        assert with_zero == without
        assert hash(with_zero) == hash(without)
        assert Resources(custom={"accel": 0}) == Resources()

    @pytest.mark.parametrize(
        ("a", "b"),
        [
            (Resources(cpu=1), Resources(cpu=2)),
            (Resources(cpu=1), Resources(gpu=1)),
            (Resources(memory=1), Resources(gpu_memory=1)),
            (Resources(custom={"a": 1}), Resources(custom={"b": 1})),
            (Resources(custom={"a": 1}), Resources(custom={"a": 2})),
            (Resources(cpu=1), Resources(cpu=1, custom={"a": 1})),
        ],
        ids=["cpu-amount", "cpu-vs-gpu", "memory-vs-gpu_memory", "custom-name", "custom-amount", "extra-custom"],
    )
    def test_different_amounts_are_unequal(self, a: Resources, b: Resources) -> None:
        """Resources that differ in any dimension or amount compare unequal."""
        assert a != b
        assert b != a

    def test_not_equal_to_other_types(self) -> None:
        """A Resources never equals a mapping or a number, even with the same amounts."""
        assert Resources(cpu=1) != {"cpu": 1}
        assert Resources() != 0
        assert Resources.__eq__(Resources(), 0) is NotImplemented

    def test_memory_is_whole_bytes_rounded_up(self) -> None:
        """A fractional byte count is rounded up to a whole int, never down."""
        resources = Resources(memory=1.2, gpu_memory=7.0)

        assert resources.memory == 2
        assert type(resources.memory) is int
        assert resources.gpu_memory == 7
        assert type(resources.gpu_memory) is int

    def test_immutable(self) -> None:
        """Neither the fields nor the custom mapping of a Resources can be changed."""
        resources = Resources(cpu=1, custom={"a": 1})

        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            resources.cpu = 2  # type: ignore[misc]
        with pytest.raises(TypeError):
            resources.custom["a"] = 5  # type: ignore[index]

    def test_custom_is_copied_from_the_callers_mapping(self) -> None:
        """Changing the mapping passed as ``custom`` later does not change the Resources."""
        given = {"a": 1.0}
        resources = Resources(custom=given)
        given["a"] = 99.0
        given["b"] = 1.0

        assert dict(resources.custom) == {"a": 1.0}

    def test_as_dict_flattens_custom_and_skips_zeros(self) -> None:
        """``as_dict`` lists the non-zero amounts, custom ones flattened in."""
        resources = Resources(cpu=4, memory=GiB, custom={"accel": 1, "gone": 0})

        assert resources.as_dict() == {"cpu": 4.0, "memory": GiB, "accel": 1.0}

    @pytest.mark.parametrize(
        ("resources", "text"),
        [
            (Resources(), "nothing"),
            (Resources(cpu=4, gpu=1, memory=8 * GiB), "cpu=4,gpu=1,memory=8GiB"),
            (Resources(cpu=0.5, memory=512 * MiB, custom={"accel": 2}), "cpu=0.5,memory=512MiB,accel=2"),
            (Resources(memory=1000), "memory=1KB"),
            (Resources(memory=8 * 10**9), "memory=8GB"),
            (Resources(memory=1001), "memory=1001"),
        ],
        ids=["empty", "builtins", "fraction-and-custom", "decimal-unit", "gb-stays-gb", "plain-bytes"],
    )
    def test_str(self, resources: Resources, text: str) -> None:
        """``str`` writes the non-zero amounts in ``parse`` syntax, bytes in the largest exact unit, binary or not."""
        assert str(resources) == text


class TestArithmetic:
    @pytest.mark.parametrize(
        ("a", "b", "expected"),
        [
            (Resources(cpu=2), Resources(cpu=1, memory=GiB), Resources(cpu=3, memory=GiB)),
            (Resources(gpu=0.5, gpu_memory=1), Resources(gpu=0.5, gpu_memory=2), Resources(gpu=1, gpu_memory=3)),
            (Resources(custom={"a": 1}), Resources(custom={"a": 2, "b": 1}), Resources(custom={"a": 3, "b": 1})),
            (Resources(cpu=1), Resources(), Resources(cpu=1)),
        ],
        ids=["cpu-memory", "gpu", "custom-merge", "plus-zero"],
    )
    def test_add(self, a: Resources, b: Resources, expected: Resources) -> None:
        """``+`` adds every dimension, custom ones by name, in either order."""
        assert a + b == expected
        assert b + a == expected

    @pytest.mark.parametrize(
        ("a", "b", "expected"),
        [
            (Resources(cpu=3, memory=GiB), Resources(cpu=1), Resources(cpu=2, memory=GiB)),
            (Resources(cpu=2, gpu=1), Resources(cpu=2, gpu=1), Resources()),
            (Resources(custom={"a": 3, "b": 1}), Resources(custom={"a": 1, "b": 1}), Resources(custom={"a": 2})),
            (Resources(gpu_memory=10), Resources(gpu_memory=4), Resources(gpu_memory=6)),
        ],
        ids=["cpu", "to-zero", "custom-drops-zero", "gpu_memory"],
    )
    def test_sub(self, a: Resources, b: Resources, expected: Resources) -> None:
        """``-`` subtracts every dimension, and a custom amount that reaches zero is dropped."""
        assert a - b == expected

    def test_sub_settles_float_noise_to_zero(self) -> None:
        """Taking back fractions that were added is zero, not a tiny negative that would raise."""
        total = Resources(cpu=0.3, custom={"a": 0.3})

        left = total - Resources(cpu=0.1, custom={"a": 0.1}) - Resources(cpu=0.2, custom={"a": 0.2})

        assert left == Resources()

    @pytest.mark.parametrize(
        ("a", "b", "field", "value"),
        [
            (Resources(cpu=1), Resources(cpu=2), "cpu", "-1"),
            (Resources(memory=1), Resources(memory=5), "memory", "-4"),
            (Resources(), Resources(gpu=1), "gpu", "-1"),
            (Resources(custom={"a": 1}), Resources(custom={"b": 1}), "custom['b']", "-1"),
        ],
        ids=["cpu", "memory", "gpu-from-nothing", "custom-absent"],
    )
    def test_sub_negative_result_raises(self, a: Resources, b: Resources, field: str, value: str) -> None:
        """Taking more than is held raises InvalidResources naming the dimension and the deficit."""
        with pytest.raises(InvalidResources) as excinfo:
            a - b

        assert field in str(excinfo.value)
        assert value in str(excinfo.value)

    @pytest.mark.parametrize("other", [1, 1.0, "cpu=1", {"cpu": 1}, None], ids=["int", "float", "str", "dict", "None"])
    def test_add_and_sub_refuse_non_resources(self, other: object) -> None:
        """``+`` and ``-`` with anything but a Resources raise TypeError."""
        with pytest.raises(TypeError):
            Resources(cpu=1) + other  # type: ignore[operator]
        with pytest.raises(TypeError):
            Resources(cpu=1) - other  # type: ignore[operator]

    def test_mul(self) -> None:
        """``*`` scales every dimension from either side; memory stays whole bytes, rounded up."""
        resources = Resources(cpu=2, gpu=1, memory=3, gpu_memory=4, custom={"a": 1})
        expected = Resources(cpu=3, gpu=1.5, memory=5, gpu_memory=6, custom={"a": 1.5})

        assert resources * 1.5 == expected
        assert 1.5 * resources == expected
        assert resources * 0 == Resources()
        assert resources * 1 == resources

    @pytest.mark.parametrize(
        ("factor", "value"),
        [(-1, "-1"), (math.nan, "nan"), (math.inf, "inf"), (True, "True"), ("2", "'2'")],
        ids=["negative", "nan", "inf", "bool", "str"],
    )
    def test_mul_bad_factor_raises(self, factor: Any, value: str) -> None:
        """A negative, non-finite or non-numeric factor raises InvalidResources naming it."""
        with pytest.raises(InvalidResources, match="factor") as excinfo:
            Resources(cpu=1) * factor

        assert value in str(excinfo.value)


class TestComparison:
    @pytest.mark.parametrize(
        ("small", "big", "fits"),
        [
            (Resources(), Resources(), True),
            (Resources(), Resources(cpu=1), True),
            (Resources(cpu=1), Resources(cpu=4, gpu=1), True),
            (Resources(cpu=4), Resources(cpu=4), True),
            (Resources(cpu=4.5), Resources(cpu=4), False),
            (Resources(cpu=1), Resources(), False),
            (Resources(gpu=1), Resources(cpu=64), False),
            (Resources(memory=GiB), Resources(memory=GiB - 1), False),
            (Resources(gpu_memory=1), Resources(memory=10 * GiB), False),
            (Resources(cpu=1, custom={"accel": 1}), Resources(cpu=2, custom={"accel": 2}), True),
            (Resources(custom={"accel": 3}), Resources(cpu=2, custom={"accel": 2}), False),
            (Resources(custom={"accel": 1}), Resources(cpu=2, custom={"other": 5}), False),
            (Resources(cpu=1, custom={"accel": 1}), Resources(cpu=0.5, custom={"accel": 1}), False),
        ],
        ids=[
            "zero-in-zero",
            "zero-in-some",
            "cpu-in-cpu-gpu",
            "equal",
            "cpu-over",
            "cpu-in-zero",
            "gpu-in-cpu-only",
            "memory-one-byte-over",
            "gpu_memory-vs-memory",
            "custom-fits",
            "custom-over",
            "custom-missing",
            "custom-fits-cpu-over",
        ],
    )
    def test_fits_in_and_operators(self, small: Resources, big: Resources, fits: bool) -> None:
        """``fits_in``, ``<=`` and the mirrored ``>=`` agree: every amount must be at most the other's."""
        assert small.fits_in(big) is fits
        assert (small <= big) is fits
        assert (big >= small) is fits

    def test_fits_in_tolerates_float_noise(self) -> None:
        """0.1 + 0.2 fits in 0.3: float noise from adding fractions is not a shortfall."""
        assert Resources(cpu=0.1) + Resources(cpu=0.2) <= Resources(cpu=0.3)
        assert Resources(cpu=0.3) >= Resources(cpu=0.1) + Resources(cpu=0.2)

    def test_ordering_with_other_types_raises(self) -> None:
        """``<=`` and ``>=`` against a non-Resources raise TypeError rather than answer."""
        with pytest.raises(TypeError):
            Resources(cpu=1) <= 4  # type: ignore[operator]  # noqa: B015
        with pytest.raises(TypeError):
            Resources(cpu=1) >= {"cpu": 4}  # type: ignore[operator]  # noqa: B015

    @pytest.mark.parametrize(
        ("request_", "available", "missing"),
        [
            (Resources(cpu=1), Resources(cpu=4), Resources()),
            (Resources(cpu=4), Resources(cpu=1.5), Resources(cpu=2.5)),
            (
                Resources(cpu=4, memory=8 * GiB, custom={"a": 1}),
                Resources(cpu=2, custom={"a": 3}),
                Resources(cpu=2, memory=8 * GiB),
            ),
            (Resources(gpu=2, custom={"accel": 2}), Resources(gpu=2), Resources(custom={"accel": 2})),
            (Resources(gpu_memory=10), Resources(gpu_memory=3, memory=100), Resources(gpu_memory=7)),
        ],
        ids=["fits", "cpu-short", "cpu-and-memory-short", "custom-missing", "gpu_memory-short"],
    )
    def test_shortfall(self, request_: Resources, available: Resources, missing: Resources) -> None:
        """``shortfall`` is what ``available`` lacks, dimension by dimension, and zero when it fits."""
        assert request_.shortfall(available) == missing
        assert bool(missing) is not request_.fits_in(available)


class TestParse:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("cpu=4,gpu=1,memory=8GiB", Resources(cpu=4, gpu=1, memory=8 * 2**30)),
            ("memory=1.5GB", Resources(memory=1_500_000_000)),
            ("memory=1.5GiB", Resources(memory=1536 * MiB)),
            ("memory=512MiB", Resources(memory=512 * MiB)),
            ("memory=3KiB", Resources(memory=3 * 1024)),
            ("memory=2TiB", Resources(memory=2 * 2**40)),
            ("memory=4kb", Resources(memory=4000)),
            ("memory=5MB", Resources(memory=5_000_000)),
            ("memory=1TB", Resources(memory=10**12)),
            ("memory=100", Resources(memory=100)),
            ("memory=100B", Resources(memory=100)),
            ("memory=1.1GiB", Resources(memory=math.ceil(1.1 * 2**30))),
            ("gpu_memory=80GiB", Resources(gpu_memory=80 * GiB)),
            ("cpu=0.5, memory=512MiB, accel=2", Resources(cpu=0.5, memory=512 * MiB, custom={"accel": 2})),
            ("  cpu = 2 ,  gpu=1  ", Resources(cpu=2, gpu=1)),
            ("cpu=1e3", Resources(cpu=1000)),
            ("cpu=.5", Resources(cpu=0.5)),
            ("cpu=4,,gpu=1,", Resources(cpu=4, gpu=1)),
            (
                "accel=2,node:10.0.0.1=1,team/x.y-z=0.5",
                Resources(custom={"accel": 2, "node:10.0.0.1": 1, "team/x.y-z": 0.5}),
            ),
            ("accel=0", Resources()),
            ("", Resources()),
        ],
        ids=[
            "design-example",
            "decimal-GB-fraction",
            "binary-GiB-fraction",
            "MiB",
            "KiB",
            "TiB",
            "lowercase-kb",
            "MB",
            "TB",
            "bare-bytes",
            "B",
            "rounds-up",
            "gpu_memory",
            "custom-and-spaces",
            "whitespace",
            "exponent",
            "leading-dot",
            "empty-parts",
            "custom-names",
            "custom-zero",
            "empty",
        ],
    )
    def test_parse(self, text: str, expected: Resources) -> None:
        """``parse`` reads name=amount pairs; byte fields take decimal or binary units; other names are custom."""
        assert Resources.parse(text) == expected

    def test_parse_memory_is_exact_bytes(self) -> None:
        """The design example's memory is exactly 8 * 2**30 bytes, an int."""
        parsed = Resources.parse("cpu=4,gpu=1,memory=8GiB")

        assert parsed.memory == 8 * 2**30
        assert type(parsed.memory) is int
        assert (parsed.cpu, parsed.gpu) == (4, 1)

    @pytest.mark.parametrize(
        ("text", "exact"),
        [("memory=1.07GB", 1_070_000_000), ("memory=4.03MB", 4_030_000)],
        ids=["GB", "MB"],
    )
    def test_parse_decimal_fraction_units_are_exact(self, text: str, exact: int) -> None:
        """A decimal amount that is a whole number of bytes in its unit parses to exactly that many bytes."""
        assert Resources.parse(text).memory == exact

    @pytest.mark.parametrize(
        "resources",
        [
            Resources(cpu=4, gpu=1, memory=8 * GiB),
            Resources(cpu=0.5),
            Resources(cpu=1 / 3),
            Resources(cpu=1e-7),
            Resources(cpu=123456789.5, gpu=0.25),
            Resources(memory=1),
            Resources(memory=1.5 * GiB),
            Resources(gpu_memory=10**9 + 1),
            Resources(memory=3 * 2**40, gpu_memory=7 * 1024),
            Resources(gpu=2, gpu_memory=80 * GiB, custom={"licence": 1}),
            Resources(custom={"accel": 2, "x.y/z:w-1": 0.25, "_private": 1e-3}),
        ],
        ids=[
            "design-example",
            "half-core",
            "third-core",
            "tiny-exponent",
            "large-fraction",
            "one-byte",
            "fractional-GiB",
            "odd-bytes",
            "TiB-and-KiB",
            "gpu-custom",
            "custom-only",
        ],
    )
    def test_round_trip(self, resources: Resources) -> None:
        """``Resources.parse(str(r)) == r``: the string form loses nothing."""
        assert Resources.parse(str(resources)) == resources

    def test_round_trip_empty(self) -> None:
        """``Resources.parse(str(Resources()))`` is the empty Resources again."""
        assert Resources.parse(str(Resources())) == Resources()


class TestCoerce:
    def test_none_is_zero(self) -> None:
        """``coerce(None)`` is the empty Resources."""
        assert Resources.coerce(None) == Resources()
        assert not Resources.coerce(None)

    def test_resources_pass_through(self) -> None:
        """``coerce`` returns a Resources as it is."""
        resources = Resources(cpu=2)

        assert Resources.coerce(resources) is resources

    def test_str_is_parsed(self) -> None:
        """``coerce`` parses a string with ``Resources.parse``."""
        assert Resources.coerce("cpu=2,memory=1GiB,accel=1") == Resources(cpu=2, memory=GiB, custom={"accel": 1})

    @pytest.mark.parametrize(
        ("mapping", "expected"),
        [
            ({"cpu": 2, "memory": 1024}, Resources(cpu=2, memory=1024)),
            ({"gpu": 1, "accel": 2}, Resources(gpu=1, custom={"accel": 2})),
            ({"cpu": 1, "custom": {"accel": 2}}, Resources(cpu=1, custom={"accel": 2})),
            ({"custom": {"a": 1}, "b": 2}, Resources(custom={"a": 1, "b": 2})),
            ({"custom": None, "cpu": 1}, Resources(cpu=1)),
            ({}, Resources()),
        ],
        ids=["builtins", "flat-custom", "nested-custom", "nested-and-flat", "custom-none", "empty"],
    )
    def test_mapping(self, mapping: dict[str, Any], expected: Resources) -> None:
        """``coerce`` reads a mapping of built-in names, with custom names flat or under ``custom``."""
        assert Resources.coerce(mapping) == expected


BAD_INPUTS: list[Any] = [
    # (id, make, field, value)
    ("cpu-negative", lambda: Resources(cpu=-1), "cpu", "-1"),
    ("gpu-negative-fraction", lambda: Resources(gpu=-0.5), "gpu", "-0.5"),
    ("memory-negative", lambda: Resources(memory=-1), "memory", "-1"),
    ("cpu-nan", lambda: Resources(cpu=math.nan), "cpu", "nan"),
    ("gpu-nan", lambda: Resources(gpu=float("nan")), "gpu", "nan"),
    ("memory-inf", lambda: Resources(memory=math.inf), "memory", "inf"),
    ("gpu_memory-minus-inf", lambda: Resources(gpu_memory=-math.inf), "gpu_memory", "-inf"),
    ("cpu-inf", lambda: Resources(cpu=math.inf), "cpu", "inf"),
    ("cpu-str", lambda: Resources(cpu="4"), "cpu", "'4'"),
    ("memory-str-with-unit", lambda: Resources(memory="8GiB"), "memory", "'8GiB'"),
    ("gpu-None", lambda: Resources(gpu=None), "gpu", "None"),
    ("cpu-True", lambda: Resources(cpu=True), "cpu", "True"),
    ("gpu_memory-False", lambda: Resources(gpu_memory=False), "gpu_memory", "False"),
    ("cpu-list", lambda: Resources(cpu=[1]), "cpu", "[1]"),
    ("custom-negative", lambda: Resources(custom={"accel": -2}), "accel", "-2"),
    ("custom-nan", lambda: Resources(custom={"accel": math.nan}), "accel", "nan"),
    ("custom-inf", lambda: Resources(custom={"accel": math.inf}), "accel", "inf"),
    ("custom-str", lambda: Resources(custom={"accel": "1"}), "accel", "'1'"),
    ("custom-None", lambda: Resources(custom={"accel": None}), "accel", "None"),
    ("custom-True", lambda: Resources(custom={"accel": True}), "accel", "True"),
    ("custom-name-empty", lambda: Resources(custom={"": 1}), "custom", "''"),
    ("custom-name-digit", lambda: Resources(custom={"9lives": 1}), "custom", "'9lives'"),
    ("custom-name-space", lambda: Resources(custom={"has space": 1}), "custom", "'has space'"),
    ("custom-name-equals", lambda: Resources(custom={"a=b": 1}), "custom", "'a=b'"),
    ("custom-name-comma", lambda: Resources(custom={"a,b": 1}), "custom", "'a,b'"),
    ("custom-name-builtin", lambda: Resources(custom={"cpu": 1}), "custom", "'cpu'"),
    ("custom-name-int", lambda: Resources(custom={1: 1}), "custom", "1"),
    ("custom-not-mapping", lambda: Resources(custom=[("a", 1)]), "custom", "[('a', 1)]"),
    ("coerce-int", lambda: Resources.coerce(5), "resources", "5"),
    ("coerce-list", lambda: Resources.coerce([("cpu", 1)]), "resources", "[('cpu', 1)]"),
    ("coerce-mapping-negative", lambda: Resources.coerce({"cpu": -1}), "cpu", "-1"),
    ("coerce-mapping-flat-custom-nan", lambda: Resources.coerce({"accel": math.nan}), "accel", "nan"),
    ("coerce-str-bad", lambda: Resources.coerce("cpu=lots"), "cpu", "'lots'"),
    ("parse-not-str", lambda: Resources.parse(4), "parse", "4"),
    ("parse-unknown-unit", lambda: Resources.parse("memory=8XB"), "memory", "XB"),
    ("parse-unit-on-cpu", lambda: Resources.parse("cpu=4GiB"), "cpu", "GiB"),
    ("parse-unit-on-custom", lambda: Resources.parse("accel=2MiB"), "accel", "MiB"),
    ("parse-name-only", lambda: Resources.parse("cpu"), "cpu", "'cpu'"),
    ("parse-amount-only", lambda: Resources.parse("=4"), "=4", "'=4'"),
    ("parse-twice", lambda: Resources.parse("cpu=4,cpu=5"), "cpu", "cpu=4,cpu=5"),
    ("parse-custom-twice", lambda: Resources.parse("accel=0,accel=1"), "accel", "accel=0,accel=1"),
    ("parse-negative", lambda: Resources.parse("cpu=-1"), "cpu", "-1"),
    ("parse-negative-memory", lambda: Resources.parse("memory=-1GiB"), "memory", "-1GiB"),
    ("parse-nan", lambda: Resources.parse("cpu=nan"), "cpu", "nan"),
    ("parse-inf", lambda: Resources.parse("gpu=inf"), "gpu", "inf"),
    ("parse-overflow", lambda: Resources.parse("gpu=1e400"), "gpu", "1e400"),
    ("parse-word", lambda: Resources.parse("cpu=four"), "cpu", "four"),
    ("parse-empty-amount", lambda: Resources.parse("cpu="), "cpu", "''"),
    ("parse-bad-custom-name", lambda: Resources.parse("bad name=1"), "custom", "'bad name'"),
]


@pytest.mark.parametrize(("make", "field", "value"), [p[1:] for p in BAD_INPUTS], ids=[p[0] for p in BAD_INPUTS])
def test_bad_input_raises_invalid_resources_naming_field_and_value(
    make: Callable[[], object], field: str, value: str
) -> None:
    """Every bad amount, name, unit or text raises InvalidResources (a ValueError) naming the field and the value."""
    with pytest.raises(InvalidResources) as excinfo:
        make()

    assert isinstance(excinfo.value, ValueError)
    message = str(excinfo.value)
    assert field in message
    assert value in message


ESCAPES_ONCE: list[Any] = [
    ("custom-names-of-mixed-types", lambda: Resources(custom={1: 1, "a": 1}), "custom", "1"),
    ("coerce-custom-not-mapping", lambda: Resources.coerce({"custom": 5}), "custom", "5"),
    ("cpu-int-too-large-for-float", lambda: Resources(cpu=10**400), "cpu", "400 digits"),
]


@pytest.mark.parametrize(("make", "field", "value"), [p[1:] for p in ESCAPES_ONCE], ids=[p[0] for p in ESCAPES_ONCE])
def test_bad_input_that_once_escaped_as_another_error(make: Callable[[], object], field: str, value: str) -> None:
    """Input that used to escape as TypeError or OverflowError raises InvalidResources naming it."""
    with pytest.raises(InvalidResources) as excinfo:
        make()

    assert field in str(excinfo.value)
    assert value in str(excinfo.value)


def test_a_very_long_resource_name_is_cut_short_in_the_error() -> None:
    """A hostile name (hypothesis found a 200-character one) keeps the message short."""
    with pytest.raises(InvalidResources) as caught:
        Resources.parse("0" * 180 + "_=0A")
    assert len(str(caught.value)) < 100 and "takes no unit" in str(caught.value)
