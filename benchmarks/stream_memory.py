"""Server memory and throughput of StreamTimeSeries over ten years of quarter-hours.

    uv run python benchmarks/stream_memory.py [--dsn postgresql://...]

Loads 350,640 points into a scratch database (on --dsn, $EDGECOM_BENCH_DSN or an embedded
PostgreSQL), starts `edgecom.py` in a subprocess and streams them back, printing how much
the server's RSS grew and how many points per second arrived. For scale, the same answer
is then asked for in one QueryTimeSeries call (query.max_points raised to allow it).
"""

from __future__ import annotations

import argparse
import time

from _harness import QUARTER_S, running_server, scratch_database, server_dsn
from google.protobuf.timestamp_pb2 import Timestamp

import edgecom

COUNT = 350_640  # ten years of quarter-hours
START_S = 1_420_070_400  # 2015-01-01T00:00:00Z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="PostgreSQL server to use (default: embedded)")
    args = parser.parse_args()
    end_s = START_S + COUNT * QUARTER_S
    cases = [
        ("UTC, 15m AVG", {"window": "15m", "aggregation": "AVG"}),
        (
            "Europe/Berlin, 15m AVG, fill zero",
            {"window": "15m", "aggregation": "AVG", "timezone": "Europe/Berlin", "fill": "zero"},
        ),
        (
            "Europe/Berlin, 1h LAST, fill linear",
            {"window": "1h", "aggregation": "LAST", "timezone": "Europe/Berlin", "fill": "linear"},
        ),
    ]
    with (
        server_dsn(args.dsn) as server,
        scratch_database(server, start_s=START_S, count=COUNT) as dsn,
        running_server(dsn, query_max_points=str(COUNT + 1)) as service,
    ):
        stub = edgecom.services.TimeSeriesServiceStub(service.channel)

        def request(**fields: str) -> object:
            return edgecom.protos.TimeSeriesRequest(
                start=Timestamp(seconds=START_S), end=Timestamp(seconds=end_s), **fields
            )

        # Warm up: the first call of each kind allocates what every later one reuses.
        warm = {"window": "15m", "aggregation": "AVG"}
        list(stub.StreamTimeSeries(request(**warm)))
        stub.QueryTimeSeries(request(**{**warm, "window": "1d"}))
        print(f"{COUNT} stored points; server RSS {service.rss_bytes() / 2**20:.1f} MiB at rest")
        for name, fields in cases:
            with service.peak_rss() as rss:
                started = time.perf_counter()
                points = pages = 0
                for page in stub.StreamTimeSeries(request(**fields)):
                    pages += 1
                    points += len(page.data)
                elapsed = time.perf_counter() - started
            print(
                f"StreamTimeSeries {name}: {points} points in {pages} pages, "
                f"{elapsed:.2f} s, {points / elapsed:,.0f} points/s, "
                f"server RSS +{(rss[1] - rss[0]) / 2**20:.1f} MiB"
            )
        with service.peak_rss() as rss:
            started = time.perf_counter()
            answer = stub.QueryTimeSeries(request(**cases[0][1]))
            elapsed = time.perf_counter() - started
        print(
            f"QueryTimeSeries {cases[0][0]} (for scale): {len(answer.data)} points, "
            f"{elapsed:.2f} s, server RSS +{(rss[1] - rss[0]) / 2**20:.1f} MiB"
        )


if __name__ == "__main__":
    main()
