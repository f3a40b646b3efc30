"""Answers' data points encoded in bulk, column by column, in the protobuf wire format."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from operator import itemgetter

# Tags of the fields written: TimeSeriesResponse.data (1, a message), TimeSeriesDataPoint's
# time (1, a message), value (2, a double) and count (3, a varint), Timestamp.seconds (1, a
# varint). The .proto's field numbers and types, which a wire-compatible change never alters.
_DATA_TAG = 0x0A
_TIME_TAG = 0x0A
_VALUE_TAG = 0x11
_COUNT_TAG = 0x18
_SECONDS_TAG = 0x08

# Bytes of a point's message besides its two varints: the time tag and length, the seconds,
# value and count tags, and the value.
_FIXED_BYTES = 5 + 8


def encode_points(points: Sequence[tuple[int, float, int]]) -> bytes:
    """A serialized TimeSeriesResponse whose data are `points`, (seconds, value, count) each.

    Valid protobuf, but not the canonical encoding: every point has the same layout, its
    varints padded to the widest one and its zero fields written out. Parsing it gives the
    message point-by-point building gives, and serializing that message the same bytes.

    Each column is converted in one step and each byte position of the layout is written
    for all points at once (a strided slice), so the time taken does not go through Python
    bytecode per point: two years of minutes (70,080 points) take about 5 ms, where a
    message built with data.add() takes about 60 ms.
    """
    n = len(points)
    if n == 0:
        return b""
    seconds = array("q", list(map(itemgetter(0), points)))
    values = array("d", list(map(itemgetter(1), points)))
    counts = array("q", list(map(itemgetter(2), points)))
    seconds_width = _varint_width(seconds)
    count_width = _varint_width(counts)
    body = _FIXED_BYTES + seconds_width + count_width
    size = 2 + body
    time_at = 5
    value_at = time_at + seconds_width + 1
    count_at = value_at + 8 + 1
    # The layout of one point; the positions left zero are written below, column by column.
    layout = bytearray(size)
    layout[0:5] = (_DATA_TAG, body, _TIME_TAG, 1 + seconds_width, _SECONDS_TAG)
    layout[value_at - 1] = _VALUE_TAG
    layout[count_at - 1] = _COUNT_TAG
    encoded = layout * n
    _write_column(encoded, size, time_at, seconds_width, *_padded_varints(seconds, seconds_width))
    _write_column(encoded, size, value_at, 8, values.tobytes(), 8)
    _write_column(encoded, size, count_at, count_width, *_padded_varints(counts, count_width))
    return bytes(encoded)


def _write_column(
    encoded: bytearray, size: int, at: int, width: int, lanes: bytes, lane: int
) -> None:
    """Copy the first `width` bytes of each point's `lane`-byte lane in `lanes` to that
    point's bytes from `at` on; points are `size` bytes apart in `encoded`."""
    for byte in range(width):
        encoded[at + byte :: size] = lanes[byte::lane]


def _varint_width(column: array) -> int:
    """Bytes of the longest varint in `column`: 10 for negative numbers (two's complement)."""
    if min(column) < 0:
        return 10
    return max(1, (max(column).bit_length() + 6) // 7)


def _padded_varints(column: array, width: int) -> tuple[bytes, int]:
    """Every number of `column` as a varint of exactly `width` bytes, its first bytes marked
    to continue even where the number needs fewer; returned in lanes of 8 or 16 bytes, one
    lane a number, with the lane's size.

    The whole column is one Python integer, its numbers side by side in lanes: each shift
    and mask below moves one 7-bit group of every number to its byte at once.
    """
    n = len(column)
    raw = column.tobytes()  # two's complement: a negative number is its 64-bit unsigned form
    lane = 8 if width <= 8 else 16
    if lane == 16:
        wide = bytearray(16 * n)
        for byte in range(8):
            wide[byte::16] = raw[byte::8]
        raw = bytes(wide)
    numbers = int.from_bytes(raw, "little")
    continued = bytearray(lane)
    continued[: width - 1] = b"\x80" * (width - 1)
    varints = int.from_bytes(bytes(continued) * n, "little")
    for group in range(width):
        group_bits = bytearray(lane)
        group_bits[group] = 0x7F
        varints |= (numbers << group) & int.from_bytes(bytes(group_bits) * n, "little")
    return varints.to_bytes(lane * n, "little"), lane
