"""Ways to build a TimeSeriesResponse from (seconds, value, count) rows, timed side by side.

    uv run python benchmarks/answer_build.py [--points 70080] [--rounds 15]

Prints the median and the best time of each way, in rounds that take turns, and checks that
every way serializes to the same bytes.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service import protos
from wire import encode_points

Rows = list[tuple[int, float, int]]


def one_add_per_point(rows: Rows) -> object:
    response = protos.TimeSeriesResponse()
    data = response.data
    for seconds, value, count in rows:
        point = data.add()
        point.time.seconds = seconds
        point.value = value
        point.count = count
    return response


def constructed_points(rows: Rows) -> object:
    point = protos.TimeSeriesDataPoint
    return protos.TimeSeriesResponse(
        data=[point(time={"seconds": s}, value=v, count=c) for s, v, c in rows]
    )


def encoded_and_parsed(rows: Rows) -> object:
    return protos.TimeSeriesResponse.FromString(encode_points(rows))


WAYS: dict[str, Callable[[Rows], object]] = {
    "data.add() a point": one_add_per_point,
    "a message a point": constructed_points,
    "encode_points + FromString": encoded_and_parsed,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=70_080)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    start_s = 1_672_531_200
    rows = [(start_s + 60 * i, round(math.sin(i * 0.37) * 500, 3), 1) for i in range(args.points)]
    expected = one_add_per_point(rows).SerializeToString()
    for name, way in WAYS.items():
        assert way(rows).SerializeToString() == expected, name
    times: dict[str, list[float]] = {name: [] for name in WAYS}
    for _ in range(args.rounds):
        for name, way in WAYS.items():
            started = time.perf_counter()
            way(rows)
            times[name].append((time.perf_counter() - started) * 1000)
    print(f"{args.points:,} points, {args.rounds} rounds: median (best) ms")
    for name, measured in times.items():
        print(f"  {name:28} {statistics.median(measured):8.2f} ({min(measured):.2f})")


if __name__ == "__main__":
    main()
