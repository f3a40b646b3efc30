"""Requests at the edges of what a client can send end with a status the client can act on.

Never UNKNOWN or INTERNAL: a request is answered, or refused with a code that says why.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import date, datetime
from zoneinfo import ZoneInfo

import grpc
import pytest
from conftest import ASSET, RunningService
from google.protobuf.timestamp_pb2 import Timestamp

import edgecom
from repository import Repository

TimeSeriesRequest = edgecom.protos.TimeSeriesRequest
MIN_S = -62_135_596_800  # 0001-01-01T00:00:00Z
MAX_S = 253_402_300_799  # 9999-12-31T23:59:59Z
DAY = 86400
YEAR_2024 = 1_704_067_200
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def request(
    start_s: int = YEAR_2024,
    end_s: int = YEAR_2024 + DAY,
    *,
    start_nanos: int = 0,
    end_nanos: int = 0,
    **fields: str,
) -> TimeSeriesRequest:
    fields.setdefault("window", "1h")
    fields.setdefault("aggregation", "AVG")
    return TimeSeriesRequest(
        start=Timestamp(seconds=start_s, nanos=start_nanos),
        end=Timestamp(seconds=end_s, nanos=end_nanos),
        **fields,
    )


def codes(service, req: TimeSeriesRequest) -> tuple[grpc.StatusCode, grpc.StatusCode]:
    """The status codes QueryTimeSeries and StreamTimeSeries end with for the request."""
    found = []
    for call in (
        lambda: service.stub.QueryTimeSeries(req, timeout=30),
        lambda: list(service.stub.StreamTimeSeries(req, timeout=30)),
    ):
        try:
            call()
            found.append(OK)
        except grpc.RpcError as exc:
            found.append(exc.code())
    return found[0], found[1]


TIMESTAMPS = {
    "start before year 1": (dict(start_s=MIN_S - 1, end_s=0), INVALID),
    "end after year 9999": (dict(start_s=0, end_s=MAX_S + 1), INVALID),
    "both far outside": (dict(start_s=-(2**62), end_s=2**62), INVALID),
    "both far ahead": (dict(start_s=2**62, end_s=2**62 + 10), INVALID),
    "start after end, far ahead": (dict(start_s=2**62 + 10, end_s=2**62), INVALID),
    "negative start nanos": (dict(start_nanos=-1), INVALID),
    "end nanos of a whole second": (dict(end_nanos=1_000_000_000), INVALID),
    "negative seconds": (dict(start_s=-1, end_s=1), OK),
    "before 1970": (dict(start_s=-(10**10), end_s=0), OK),
    "year 1": (dict(start_s=MIN_S, end_s=MIN_S + DAY), OK),
    "year 9999": (dict(start_s=MAX_S - DAY, end_s=MAX_S), OK),
    "last instant of year 9999": (
        dict(start_s=MAX_S, start_nanos=1, end_s=MAX_S, end_nanos=999_999_999),
        OK,
    ),
    "all of time": (dict(start_s=MIN_S, end_s=MAX_S, window="366d"), OK),
    "all of time in minutes": (dict(start_s=MIN_S, end_s=MAX_S, window="1m", fill="zero"), OK),
}


@pytest.mark.parametrize("fill", ["", "previous"])
@pytest.mark.parametrize("case", TIMESTAMPS)
def test_timestamps_outside_the_valid_range_are_invalid_argument(service, case, fill):
    fields, expected = TIMESTAMPS[case]
    fields = {"fill": fill, **fields}
    assert codes(service, request(**fields)) == (expected, expected)


FIELDS = {
    "zero window": (dict(window="0m"), INVALID),
    "fractional window": (dict(window="1.5h"), INVALID),
    "negative window": (dict(window="-1h"), INVALID),
    "window in Arabic-Indic digits": (dict(window="\u0661h"), INVALID),
    "window of 20 digits": (dict(window="99999999999999999999d"), INVALID),
    "months of 20 digits": (dict(window="99999999999999999999mo"), INVALID),
    "empty window": (dict(window=""), INVALID),
    "padded window": (dict(window=" 1h "), OK),
    "upper-case minutes": (dict(window="1M"), OK),
    "empty aggregation": (dict(aggregation=""), INVALID),
    "timezone Local": (dict(timezone="Local"), INVALID),
    "timezone parent path": (dict(timezone="../etc"), INVALID),
    "timezone absolute path": (dict(timezone="/etc/localtime"), INVALID),
    "timezone directory": (dict(timezone="Europe"), INVALID),
    "timezone data file": (dict(timezone="zone.tab"), INVALID),
    "timezone with NUL": (dict(timezone="Europe/Berlin\x00"), INVALID),
    "timezone too long": (dict(timezone="x" * 5000), INVALID),
    "timezone lower-case utc": (dict(timezone="utc"), INVALID),
    "unknown fill": (dict(fill="sideways"), INVALID),
    "asset id with quotes": (dict(asset_id="x'; DROP TABLE points; --"), grpc.StatusCode.NOT_FOUND),
    "asset id with NUL": (dict(asset_id="a\x00b"), grpc.StatusCode.NOT_FOUND),
}


@pytest.mark.parametrize("case", FIELDS)
def test_odd_fields_are_answered_or_refused_with_a_clear_code(service, case):
    fields, expected = FIELDS[case]
    assert codes(service, request(**fields)) == (expected, expected)


@pytest.mark.parametrize("timeout_s", [25 * DAY, 400 * DAY])
def test_a_far_deadline_is_no_deadline_for_the_database(service, timeout_s):
    req = request()
    service.stub.QueryTimeSeries(req, timeout=timeout_s)
    list(service.stub.StreamTimeSeries(req, timeout=timeout_s))


LONG = {
    "window": INVALID,
    "aggregation": INVALID,
    "timezone": INVALID,
    "fill": INVALID,
    "asset_id": grpc.StatusCode.NOT_FOUND,
}


@pytest.mark.parametrize("field", LONG)
def test_a_long_value_is_refused_with_its_own_code_and_a_short_message(service, field):
    # Quoted whole, it would not fit the client's 8 KiB trailer limit.
    req = request(**{field: "x" * 100_000})
    assert codes(service, req) == (LONG[field], LONG[field])
    with pytest.raises(grpc.RpcError) as info:
        service.stub.QueryTimeSeries(req, timeout=30)
    assert field.split("_")[0] in info.value.details()
    assert len(info.value.details()) < 1000


def test_an_unknown_asset_among_thousands_configured_is_not_found(repository):
    assets = (ASSET, *(f"{n:08d}-0000-4000-8000-000000000000" for n in range(2000)))
    running = RunningService(repository, assets=assets, max_points=1000)
    try:
        assert codes(running, request(asset_id="nope")) == (grpc.StatusCode.NOT_FOUND,) * 2
    finally:
        running.close()


# --- ranges of millennia ----------------------------------------------------------------------

FILLS = ("none", "zero", "previous", "linear", "nan")
BOUNDED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
DEADLINE_S = 2.0


def one_day_of_quarter_hours() -> list[tuple[int, float]]:
    return [(YEAR_2024 + i * 900, float(i % 7)) for i in range(96)]


@contextmanager
def two_worker_server(repository: Repository) -> Iterator[edgecom.services.TimeSeriesServiceStub]:
    """A server with two worker threads: two calls that never end leave none for anyone else."""
    servicer = edgecom.TimeSeriesServicer(
        repository=repository, assets=(ASSET,), max_points=100_000
    )
    server, port = edgecom.create_server(
        address="127.0.0.1:0",
        servicer=servicer,
        health_servicer=edgecom.health.HealthServicer(),
        max_workers=2,
    )
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


def ending(call) -> tuple[grpc.StatusCode, float]:
    """The status a call ends with and the seconds it took."""
    began = time.monotonic()
    try:
        call()
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
    return code, time.monotonic() - began


@pytest.mark.parametrize("zone", ["", "Europe/Berlin"])
@pytest.mark.parametrize("fill", FILLS)
def test_a_minute_fill_over_all_of_time_ends_by_its_deadline_while_others_are_answered(
    repository, fill, zone
):
    repository.upsert_points(ASSET, one_day_of_quarter_hours())
    hostile = request(MIN_S, MAX_S, window="1m", fill=fill, timezone=zone)
    small = request(YEAR_2024, YEAR_2024 + DAY)
    with (
        two_worker_server(repository) as address,
        grpc.insecure_channel(address) as channel,
        grpc.insecure_channel(address) as other_channel,
        ThreadPoolExecutor(2) as pool,
    ):
        stub = edgecom.services.TimeSeriesServiceStub(channel)
        other = edgecom.services.TimeSeriesServiceStub(other_channel)
        calls = [
            pool.submit(ending, lambda: stub.QueryTimeSeries(hostile, timeout=DEADLINE_S)),
            pool.submit(ending, lambda: list(stub.StreamTimeSeries(hostile, timeout=DEADLINE_S))),
        ]
        # Both workers may be busy until the hostile calls' deadline, not longer.
        answered = [len(other.QueryTimeSeries(small, timeout=DEADLINE_S + 3).data)]
        while not all(call.done() for call in calls):
            answered.append(len(other.QueryTimeSeries(small, timeout=DEADLINE_S + 3).data))
        answered.append(len(other.QueryTimeSeries(small, timeout=DEADLINE_S).data))
        ends = [call.result() for call in calls]
    assert set(answered) == {24}
    for code, seconds in ends:
        assert code in BOUNDED and seconds < DEADLINE_S + 1, (code, seconds)


def test_local_days_between_points_millennia_apart_end_by_the_deadline(repository):
    # Points at both ends of the calendar (stored before points were checked on the way in)
    # lay millions of local days between them, all to be laid out before the database is asked.
    repository.upsert_points(ASSET, [(MIN_S + DAY, 1.0), (MAX_S - DAY, 2.0)])
    hostile = request(MIN_S, MAX_S, window="1d", timezone="Europe/Berlin")
    small = request(YEAR_2024, YEAR_2024 + DAY)
    with (
        two_worker_server(repository) as address,
        grpc.insecure_channel(address) as channel,
        ThreadPoolExecutor(2) as pool,
    ):
        stub = edgecom.services.TimeSeriesServiceStub(channel)
        calls = [
            pool.submit(ending, lambda: stub.QueryTimeSeries(hostile, timeout=DEADLINE_S)),
            pool.submit(ending, lambda: list(stub.StreamTimeSeries(hostile, timeout=DEADLINE_S))),
        ]
        ends = [call.result() for call in calls]
        assert stub.QueryTimeSeries(small, timeout=DEADLINE_S).data == []
    for code, seconds in ends:
        assert code in BOUNDED and seconds < DEADLINE_S + 1, (code, seconds)


def test_sigterm_during_fills_over_all_of_time_exits_within_the_grace_period(
    start_service,
    repository,
):
    repository.upsert_points(ASSET, one_day_of_quarter_hours())
    grace_s = 2
    service = start_service(EDGECOM_SERVER_GRACE_PERIOD=f"{grace_s}s")
    service.wait_serving()
    stub = service.stub()
    # No deadlines: only the shutdown can end them.
    reqs = [
        request(MIN_S, MAX_S, window="1m", fill=fill, timezone=zone)
        for fill in ("previous", "linear", "zero")
        for zone in ("", "Europe/Berlin")
    ]
    calls = [stub.QueryTimeSeries.future(req) for req in reqs]
    for req in reqs:
        threading.Thread(
            target=lambda r=req: ending(lambda: list(stub.StreamTimeSeries(r))), daemon=True
        ).start()
    time.sleep(1)
    began = time.monotonic()
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(grace_s + 10) == 0, service.log_text()
    assert time.monotonic() - began < grace_s + 5
    assert all(call.done() for call in calls)


# --- the limits of the calendar ------------------------------------------------------------------


def local_midnight(day: date, zone: str) -> int:
    """Unix seconds of local midnight on `day`, without datetime outside years 1 to 9999."""
    naive = datetime(day.year, day.month, day.day)
    offset = ZoneInfo(zone).utcoffset(naive)
    return int((naive - datetime(1970, 1, 1) - offset).total_seconds())


LAST_DAY = date(9999, 12, 31)  # a Friday
FIRST_DAY = date(1, 1, 1)  # a Monday
CALENDAR_END = {
    "1mo": date(9999, 12, 1),
    "12mo": date(9999, 1, 1),
    "1w": date(9999, 12, 27),
    "1d": LAST_DAY,
}


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/New_York"])
@pytest.mark.parametrize("window", CALENDAR_END)
def test_ranges_ending_at_the_last_second_of_year_9999_are_answered(service, window, zone):
    point_s = MAX_S - 12 * 3600  # 9999-12-31T11:59:59Z: that day in each of these zones
    service.repository.upsert_points(ASSET, [(point_s, 7.0)])
    req = request(MAX_S - 40 * DAY, MAX_S, window=window, timezone=zone, fill="zero")
    answer = service.stub.QueryTimeSeries(req, timeout=30).data
    streamed = [p for page in service.stub.StreamTimeSeries(req, timeout=30) for p in page.data]
    assert answer and list(answer) == streamed
    last = answer[-1]
    assert (last.time.seconds, last.value, last.count) == (
        local_midnight(CALENDAR_END[window], zone),
        7.0,
        1,
    )
    assert [p.time.seconds for p in answer] == sorted({p.time.seconds for p in answer})


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/New_York"])
@pytest.mark.parametrize("window", ["1d", "1w", "1mo", "12mo", "1h"])
def test_ranges_starting_at_the_first_second_of_year_1_are_answered(service, window, zone):
    point_s = MIN_S + 12 * 3600  # 0001-01-01T12:00:00Z: that day in each of these zones
    service.repository.upsert_points(ASSET, [(point_s, 7.0)])
    req = request(MIN_S, MIN_S + 40 * DAY, window=window, timezone=zone)
    answer = service.stub.QueryTimeSeries(req, timeout=30).data
    streamed = [p for page in service.stub.StreamTimeSeries(req, timeout=30) for p in page.data]
    assert list(answer) == streamed
    [point] = answer
    # East of Greenwich, year 1 begins locally before it does in UTC: that first bucket
    # starts at the first second a Timestamp can hold.
    expected = max(MIN_S, local_midnight(FIRST_DAY, zone))
    if window == "1h":
        expected += (point_s - expected) // 3600 * 3600
    assert (point.time.seconds, point.value, point.count) == (expected, 7.0, 1)


@pytest.mark.parametrize(
    "window",
    [
        "1" * 4301 + "m",  # past Python's int() digit limit
        "0" * 5000 + "1h",
        "1" + "0" * 10_000 + "mo",
    ],
)
def test_a_window_of_thousands_of_digits_is_invalid_argument(service, window):
    assert codes(service, request(window=window)) == (INVALID, INVALID)


# Bytes that are no protobuf message, or whose field 3 (TimeSeriesRequest's window, and a
# string in a reflection request too) is not UTF-8. Other request types skip an unknown field 3.
UNDECODABLE = {
    "bad tag": (b"\xff\xff\xff\xff", True),
    "truncated field": (b"\x0a\x05\x08", True),
    "window not UTF-8": (b"\x1a\x01\xff", False),
    "window a UTF-8 surrogate": (b"\x1a\x03" + "\ud800".encode("utf-8", "surrogatepass"), False),
}
REFLECTION_METHOD = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def raw_code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        assert "decode" in exc.details(), exc.details()
        return exc.code()
    return OK


@pytest.mark.parametrize("case", UNDECODABLE)
def test_request_bytes_that_do_not_decode_are_invalid_argument_without_traceback(
    service, caplog, case
):
    data, every_method = UNDECODABLE[case]
    # No serializers: the bytes go on the wire as they are.
    channel = service.channel
    unary = ["/edgecom.TimeSeriesService/QueryTimeSeries"]
    if every_method:
        unary += ["/edgecom.TimeSeriesService/ListAssets", "/grpc.health.v1.Health/Check"]
    stream = channel.unary_stream("/edgecom.TimeSeriesService/StreamTimeSeries")
    reflection = channel.stream_stream(REFLECTION_METHOD)
    calls = [lambda m=m: channel.unary_unary(m)(data, timeout=10) for m in unary]
    calls.append(lambda: list(stream(data, timeout=10)))
    calls.append(lambda: list(reflection(iter([data]), timeout=10)))
    with caplog.at_level("DEBUG"):
        assert [raw_code(call) for call in calls] == [INVALID] * len(calls)
    noisy = [r for r in caplog.records if r.exc_info or r.levelno >= 30]
    assert not noisy, [r.getMessage() for r in noisy]
