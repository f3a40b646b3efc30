"""Points encoded in bulk parse to the message built point by point, and serialize alike."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wire import encode_points

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proto"))
protos, _ = grpc.protos_and_services("edgecom.proto")

INT64 = st.integers(-(2**63), 2**63 - 1)
POINTS = st.lists(st.tuples(INT64, st.floats(), st.integers(0, 2**63 - 1)), max_size=40)


def built(points: list[tuple[int, float, int]]) -> Any:
    """The answer as the servicer built it before: one data.add() a point."""
    response = protos.TimeSeriesResponse()
    for seconds, value, count in points:
        point = response.data.add()
        point.time.seconds = seconds
        point.value = value
        point.count = count
    return response


def check(points: list[tuple[int, float, int]]) -> None:
    parsed = protos.TimeSeriesResponse.FromString(encode_points(points))
    assert parsed.SerializeToString() == built(points).SerializeToString()


@pytest.mark.parametrize(
    "points",
    [
        [],
        [(0, 0.0, 0)],
        [(1_700_000_000, -0.0, 1), (1_700_000_060, math.nan, 127), (1_700_000_120, 2.5, 128)],
        [(-62_135_596_800, math.inf, 5), (253_402_300_799, -math.inf, 2**63 - 1)],
        [(-1, 5e-324, 0), (2**63 - 1, 1.7976931348623157e308, 1)],
        # Every varint width: the widest number of a column sets the width of all of it.
        [(2 ** (7 * k) - 1, float(k), min(2 ** (7 * k), 2**63 - 1)) for k in range(1, 10)],
    ],
)
def test_edge_values_serialize_as_built(points: list[tuple[int, float, int]]) -> None:
    check(points)


@given(POINTS)
def test_any_points_serialize_as_built(points: list[tuple[int, float, int]]) -> None:
    check(points)


def test_encoded_chunks_joined_are_one_answer() -> None:
    points = [(1_700_000_000 + 60 * i, i / 7, i % 300) for i in range(1000)]
    joined = encode_points(points[:300]) + encode_points(points[300:])
    parsed = protos.TimeSeriesResponse.FromString(joined)
    assert parsed.SerializeToString() == built(points).SerializeToString()
