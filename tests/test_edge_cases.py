"""Requests at the edges of what a client can send end with a status the client can act on.

Never UNKNOWN or INTERNAL: a request is answered, or refused with a code that says why.
"""

from __future__ import annotations

import grpc
import pytest
from conftest import ASSET, RunningService
from google.protobuf.timestamp_pb2 import Timestamp

import edgecom

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
