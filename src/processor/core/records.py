"""The typed values that flow through the pipeline: a decoded record or a rejection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Final

import msgspec
from msgspec import Meta

IoValue = int | bytes

MAX_TS_MS: Final = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
MAX_U32: Final = 2**32 - 1

U8 = Annotated[int, Meta(ge=0, le=255)]
U16 = Annotated[int, Meta(ge=0, le=65535)]
Millis = Annotated[int, Meta(ge=0, le=MAX_TS_MS)]


class Sentinel(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A contract sentinel object as it arrives; the decoder replaces it with its value."""

    bigint: str | None = msgspec.field(default=None, name="$bigint")
    # msgspec decodes base64 into bytes itself (strict: padding required, no whitespace).
    raw: bytes | None = msgspec.field(default=None, name="$bytes")


if TYPE_CHECKING:
    IoMap = dict[int, IoValue]
else:
    # What msgspec decodes and validates: unsigned 32-bit integers or sentinel objects.
    # The decoder replaces each sentinel with its value, so code sees ``dict[int, IoValue]``.
    IoMap = dict[U16, Annotated[int, Meta(ge=0, le=MAX_U32)] | Sentinel]


class Record(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One AVL record from the stream contract v1, validated and sentinel-decoded.

    The payload JSON decodes straight into this type (the field constraints are the
    contract's ranges); the decoder then fills ``stream_id``, ``imei`` and ``device_id``
    from the stream entry. Times are milliseconds since the Unix epoch (UTC), exactly as
    the device and the ingestion service sent them. ``io`` maps the IO id to an unsigned
    integer (64-bit values exact) or, for variable-length elements, raw bytes.
    """

    codec: int
    ts: Millis
    received_at: Millis
    priority: Annotated[int, Meta(ge=0, le=2)]
    lat: Annotated[float, Meta(ge=-90.0, le=90.0)]
    lon: Annotated[float, Meta(ge=-180.0, le=180.0)]
    alt: Annotated[int, Meta(ge=-32768, le=32767)]
    angle: Annotated[int, Meta(ge=0, le=359)]
    sat: U8
    speed: U16
    event_io: U16
    io: IoMap
    generation: U8 | None = None
    # Filled from the stream entry, never from the payload: the decoder rejects a payload
    # that names these keys (their wire names start with "@@").
    stream_id: str = msgspec.field(default="", name="@@stream_id")
    imei: str = msgspec.field(default="", name="@@imei")
    device_id: int = msgspec.field(default=0, name="@@device_id")


class Rejection(msgspec.Struct, frozen=True):
    """Why an entry cannot become a record: a machine reason code and a human detail."""

    reason: str
    detail: str
