"""QueryTimeSeries latency over two years of quarter-hours, UTC and local calendar buckets.

    uv run python benchmarks/query_speed.py [--dsn postgresql://...] [--repeat 7]

Loads 70,080 points into a scratch database (on --dsn, $EDGECOM_BENCH_DSN or an embedded
PostgreSQL), starts `edgecom.py` in a subprocess with the cache off and prints the median
and best time of each query over the whole two years, as a client sees it.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _harness import QUARTER_S, running_server, scratch_database, server_dsn
from google.protobuf.timestamp_pb2 import Timestamp

import edgecom

COUNT = 2 * 365 * 96  # two years of quarter-hours
START_S = 1_672_531_200  # 2023-01-01T00:00:00Z

CASES = [
    ("1h", "AVG", "", ""),
    ("1h", "AVG", "Europe/Berlin", ""),
    ("1h", "LAST", "Europe/Berlin", ""),
    ("1h", "AVG", "Europe/Berlin", "linear"),
    ("15m", "SUM", "", ""),
    ("15m", "SUM", "America/New_York", "zero"),
    ("1d", "SUM", "", ""),
    ("1d", "SUM", "Europe/Berlin", ""),
    ("1d", "COUNT", "Australia/Lord_Howe", "previous"),
    ("1w", "MAX", "America/New_York", ""),
    ("1mo", "SUM", "Europe/Berlin", ""),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="PostgreSQL server to use (default: embedded)")
    parser.add_argument("--repeat", type=int, default=7, help="runs of each query")
    args = parser.parse_args()
    end_s = START_S + COUNT * QUARTER_S
    with (
        server_dsn(args.dsn) as server,
        scratch_database(server, start_s=START_S, count=COUNT) as dsn,
        running_server(dsn, cache_size="0") as service,
    ):
        stub = edgecom.services.TimeSeriesServiceStub(service.channel)
        print(f"{COUNT} points over two years; times per call, median (best) of {args.repeat}")
        for window, aggregation, timezone, fill in CASES:
            request = edgecom.protos.TimeSeriesRequest(
                start=Timestamp(seconds=START_S),
                end=Timestamp(seconds=end_s),
                window=window,
                aggregation=aggregation,
                timezone=timezone,
                fill=fill,
            )
            stub.QueryTimeSeries(request)
            times = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                answer = stub.QueryTimeSeries(request)
                times.append(time.perf_counter() - started)
            label = f"{window:>3} {aggregation:<5} {timezone or 'UTC':<19} {fill or 'none':<8}"
            print(
                f"{label} {len(answer.data):>6} points  "
                f"{statistics.median(times) * 1000:7.1f} ms ({min(times) * 1000:.1f})"
            )


if __name__ == "__main__":
    main()
