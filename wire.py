"""Answers' data points encoded in bulk, column by column, in the protobuf wire format."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from operator import itemgetter

# Tags of the fields written, from the .proto's field numbers and types, which a
# wire-compatible change never alters: TimeSeriesResponse.data (1, a message),
# TimeSeriesDataPoint.time (1, a message), .value (2, a double) and .count (3, a varint),
# Timestamp.seconds (1, a varint).
_DATA_TAG = 0x0A
_TIME_TAG = 0x0A
_SECONDS_TAG = 0x08
_VALUE_TAG = 0x11
_COUNT_TAG = 0x18

# Bytes of a point's message besides its two varints: the time tag and length, the seconds,
# value and count tags, and the value.
_FIXED_BYTES = 5 + 8


def _translation(transform: Callable[[int], int]) -> bytes:
    return bytes(transform(byte) for byte in range(256))


# Byte k of a varint holds the number's bits 7k to 7k+6, which start at bit 7k % 8 of its
# byte 7k // 8 and, from the second bit on, go on in the byte above. These tables take those
# bits out of each byte, for each bit they start at: the lower byte's with and without the
# continuation bit (set on every varint byte but the last), the higher byte's.
_LOW_BITS = tuple(
    (
        _translation(lambda b, s=s: (b >> s) & 0x7F),
        _translation(lambda b, s=s: (b >> s) & 0x7F | 0x80),
    )
    for s in range(8)
)
_HIGH_BITS = tuple(_translation(lambda b, s=s: (b << (8 - s)) & 0x7F) for s in range(8))
# Each byte's bit length: how wide the widest number is, found without a loop over them.
_BIT_LENGTHS = _translation(int.bit_length)


def encode_points(points: Sequence[tuple[int, float, int]]) -> bytes:
    """A serialized TimeSeriesResponse whose data are `points`, (seconds, value, count) each.

    Valid protobuf, but not the canonical encoding: every point has the same layout, its
    varints padded to the widest one and its zero fields written out. Parsing it gives the
    message point-by-point building gives, and serializing that message the same bytes.

    Each column is converted in one step and each byte position of the layout is written
    for all points at once (a strided slice), so no Python code runs per point.
    """
    n = len(points)
    if n == 0:
        return b""
    seconds = struct.pack(f"<{n}q", *map(itemgetter(0), points))
    values = struct.pack(f"<{n}d", *map(itemgetter(1), points))
    counts = struct.pack(f"<{n}q", *map(itemgetter(2), points))
    seconds_width = _varint_width(seconds)
    count_width = _varint_width(counts)
    body = _FIXED_BYTES + seconds_width + count_width
    size = 2 + body
    seconds_at = 5
    value_at = seconds_at + seconds_width + 1
    count_at = value_at + 8 + 1
    # One point's bytes; what is left zero is written below, a byte position at a time.
    layout = bytearray(size)
    layout[:seconds_at] = (_DATA_TAG, body, _TIME_TAG, 1 + seconds_width, _SECONDS_TAG)
    layout[value_at - 1] = _VALUE_TAG
    layout[count_at - 1] = _COUNT_TAG
    encoded = layout * n
    for k, column in enumerate(_varint_columns(seconds, seconds_width)):
        encoded[seconds_at + k :: size] = column
    for k in range(8):
        encoded[value_at + k :: size] = values[k::8]
    for k, column in enumerate(_varint_columns(counts, count_width)):
        encoded[count_at + k :: size] = column
    return bytes(encoded)


def _varint_width(numbers: bytes) -> int:
    """Bytes of the longest varint among `numbers`, int64s of 8 little-endian bytes each:
    10 when one is negative, as a varint holds its two's complement."""
    n = len(numbers) // 8
    for byte in reversed(range(8)):
        column = numbers[byte::8]
        if column.count(0) == n:
            continue
        lengths = column.translate(_BIT_LENGTHS)
        bits = next(bits for bits in range(8, 0, -1) if bits in lengths)
        if byte == 7 and bits == 8:
            return 10
        return (8 * byte + bits + 6) // 7
    return 1


def _varint_columns(numbers: bytes, width: int) -> list[bytes]:
    """Byte k of each number's varint of exactly `width` bytes, for k from 0 to width - 1.

    `numbers` are int64s of 8 little-endian bytes each; bytes above a number's own varint
    are 0x80 (continued) or, the last one, 0x00: longer than need be, but valid.
    """
    n = len(numbers) // 8
    columns = []
    for k in range(width):
        byte, shift = divmod(7 * k, 8)
        low = numbers[byte::8].translate(_LOW_BITS[shift][k < width - 1])
        if shift < 2 or byte == 7:
            columns.append(low)
            continue
        # The two parts have no bit in common: adding them as numbers ors them bytewise.
        high = numbers[byte + 1 :: 8].translate(_HIGH_BITS[shift])
        both = int.from_bytes(low, "little") + int.from_bytes(high, "little")
        columns.append(both.to_bytes(n, "little"))
    return columns
