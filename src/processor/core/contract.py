"""Stream contract v1 decoder: entry fields in, a :class:`Record` or a :class:`Rejection` out.

Pure and total: :func:`decode_entry` never raises, whatever it is given. The rules are in
docs/message-schemas.md (from the ingestion contract): three stream fields (``v``, ``imei``,
``payload``), a JSON payload of fixed keys, and IO values that are unsigned integers or the
sentinel objects ``{"$bigint": "<decimal>"}`` and ``{"$bytes": "<base64>"}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from itertools import repeat
from operator import attrgetter, contains
from typing import Any, Final, cast

import msgspec

from processor.core.records import IoValue, Record, Rejection
from processor.core.records import Sentinel as _Sentinel

CONTRACT_VERSION: Final = b"1"
SUPPORTED_CODECS: Final = frozenset({8, 16, 142})
MAX_U64: Final = 2**64 - 1

# Reason codes (dead-letter ``reason`` field).
INVALID_JSON: Final = "invalid_json"
MISSING_FIELD: Final = "missing_field"
UNEXPECTED_FIELD: Final = "unexpected_field"
BAD_TYPE: Final = "bad_type"
BAD_SENTINEL: Final = "bad_sentinel"
OUT_OF_RANGE: Final = "out_of_range"
UNSUPPORTED_VERSION: Final = "unsupported_version"
TOO_LARGE: Final = "too_large"
MAX_DELIVERIES: Final = "max_deliveries"

_FIELDS: Final = frozenset({b"v", b"imei", b"payload"})
_FIELD_NAME_BYTES: Final = sum(len(name) for name in _FIELDS)

_decoder: Final = msgspec.json.Decoder(Record)

# Keys of the payload that are always there (``generation`` may be left out).
_REQUIRED_KEYS: Final = 12

# Valid IMEIs seen recently, with their text and number: a fleet is a few thousand devices
# sending every second, and a dict hit costs far less than checking and converting the
# bytes each time. Only valid IMEIs enter it, so a hit also means "already checked".
_IMEI_CACHE_SIZE: Final = 65_536
_imeis: dict[bytes, tuple[str, int]] = {}


def decode_entry(
    stream_id: str,
    fields: Mapping[bytes, bytes] | Mapping[str, str] | Mapping[bytes | str, bytes | str],
    *,
    max_entry_bytes: int = 65_536,
    max_io_elements: int = 512,
) -> Record | Rejection:
    """Decode and validate one stream entry; never raises."""
    try:
        return _decode(stream_id, fields, max_entry_bytes, max_io_elements)
    except Exception as exc:  # noqa: BLE001 - the decoder is total: any surprise is a rejection
        return Rejection(BAD_TYPE, f"undecodable entry: {type(exc).__name__}")


def _decode(
    stream_id: str,
    fields: Mapping[bytes | str, bytes | str] | Mapping[bytes, bytes] | Mapping[str, str],
    max_bytes: int,
    max_io: int,
) -> Record | Rejection:
    version = imei = payload = None
    if type(fields) is dict and len(fields) == 3:  # the redis-py shape: bytes to bytes
        version = fields.get(b"v")
        imei = fields.get(b"imei")
        payload = fields.get(b"payload")
    if type(version) is not bytes or type(imei) is not bytes or type(payload) is not bytes:
        return _decode_unusual(stream_id, fields, max_bytes, max_io)
    size = _FIELD_NAME_BYTES + len(version) + len(imei) + len(payload)
    if size > max_bytes:
        return Rejection(TOO_LARGE, f"entry is {size} bytes, limit {max_bytes}")
    if version != CONTRACT_VERSION:
        return Rejection(UNSUPPORTED_VERSION, f"contract version {_show(version)} is not 1")
    identity = _imeis.get(imei)
    if identity is None:
        if len(imei) != 15 or not imei.isdigit():
            return Rejection(BAD_TYPE, f"imei must be 15 decimal digits, got {_show(imei)}")
        identity = _remember(imei)
    if not payload.isascii():
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Rejection(INVALID_JSON, f"payload is not UTF-8 (byte {exc.start})")
    try:
        record = _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        return _classify(str(exc))
    except msgspec.DecodeError as exc:
        return Rejection(INVALID_JSON, f"payload is not valid JSON: {exc}")
    if record.device_id or record.imei or record.stream_id:
        return Rejection(UNEXPECTED_FIELD, "payload names a key reserved for the stream entry")
    if record.codec not in SUPPORTED_CODECS:
        return Rejection(OUT_OF_RANGE, f"codec {record.codec} is not 8, 16 or 142")
    if len(record.io) > max_io:
        return Rejection(TOO_LARGE, f"{len(record.io)} IO elements, limit {max_io}")
    # A sentinel is a JSON object inside ``io``, and an object needs a literal "{" (it
    # cannot be escaped): beyond the payload's own and io's, each "{" may be one.
    sentinels = payload.count(b"{") - 2
    if sentinels > 0:
        failure = _decode_io(record.io, sentinels)
        if failure is not None:
            return failure
    if _has_duplicate_keys(payload, len(record.io), max(sentinels, 0)):
        # Which value a repeated key means differs between JSON parsers (msgspec keeps
        # the last); an entry others could read differently is not stored.
        return Rejection(INVALID_JSON, "payload names a key twice in one JSON object")
    record.stream_id = stream_id
    record.imei, record.device_id = identity
    return record


def decode_run(
    stream_ids: Sequence[str],
    versions: Sequence[bytes],
    imeis: Sequence[bytes],
    payloads: Sequence[bytes],
    *,
    max_entry_bytes: int = 65_536,
    max_io_elements: int = 512,
) -> list[Record] | None:
    """The records of a run of entries (``v``, ``imei``, ``payload`` each), or None.

    The records are exactly what :func:`decode_entry` gives for each entry when every
    entry of the run is valid; otherwise (or when that is not certain) None, and the
    caller decodes each entry with :func:`decode_entry`, which names the reasons. The
    same checks as :func:`decode_entry`, made once over the whole run where they can be
    (types, versions, sizes, ASCII, codecs, IO counts, the key count of the duplicate-key
    check), so that the per-entry Python work is the JSON decode and the sentinels.
    """
    count = len(payloads)
    if not count:
        return []
    if not (len(stream_ids) == len(versions) == len(imeis) == count):
        raise ValueError("stream_ids, versions, imeis and payloads differ in length")
    try:
        return _decode_run(stream_ids, versions, imeis, payloads, max_entry_bytes, max_io_elements)
    except Exception:  # noqa: BLE001 - anything unusual: decode_entry says what, one by one
        return None


_codec: Final = attrgetter("codec")
_io: Final = attrgetter("io")
_device_id: Final = attrgetter("device_id")
_imei: Final = attrgetter("imei")
_stream_id: Final = attrgetter("stream_id")
_BYTES: Final = frozenset({bytes})
_GENERATION: Final = b'"generation"'


def _decode_run(
    stream_ids: Sequence[str],
    versions: Sequence[bytes],
    imeis: Sequence[bytes],
    payloads: Sequence[bytes],
    max_bytes: int,
    max_io: int,
) -> list[Record] | None:
    count = len(payloads)
    if set(map(type, payloads)) != _BYTES or set(map(type, imeis)) != _BYTES:
        return None
    # Every version equal to b"1" (and so one byte long, and bytes: str never equals it).
    if versions.count(CONTRACT_VERSION) != count or set(map(type, versions)) != _BYTES:
        return None
    longest = _FIELD_NAME_BYTES + len(CONTRACT_VERSION) + max(map(len, imeis))
    if longest + max(map(len, payloads)) > max_bytes:  # not certain every entry fits
        return None
    known = list(map(_imeis.get, imeis))
    identities = _identities(imeis) if None in known else cast(list[tuple[str, int]], known)
    if identities is None:
        return None
    text = b"".join(payloads)
    if not text.isascii():  # UTF-8 checked entry by entry
        return None
    records = list(map(_decoder.decode, payloads))  # an invalid payload raises: None
    if any(map(_device_id, records)) or any(map(_imei, records)) or any(map(_stream_id, records)):
        return None
    if not set(map(_codec, records)) <= SUPPORTED_CODECS:
        return None
    ios = list(map(_io, records))
    io_lens = list(map(len, ios))
    if max(io_lens) > max_io:
        return None
    # Sentinels: as in _decode, each "{" beyond a payload's own two may be one. Counted
    # entry by entry when the first entry has some (a stream that carries them), else
    # over the whole run first.
    braces: list[int] | None = None
    if payloads[0].count(b"{") > 2:
        braces = list(map(bytes.count, payloads, repeat(b"{")))
        sentinels = sum(braces) - 2 * count
    else:
        sentinels = text.count(b"{") - 2 * count
    if sentinels:
        if braces is None:
            braces = list(map(bytes.count, payloads, repeat(b"{")))
        if not _decode_run_sentinels(braces, ios):
            return None
    # The duplicate-key check of _has_duplicate_keys, summed over the run: an entry's
    # colons are never fewer than the keys it is counted to have, so the sums are equal
    # only when every entry's are (then none repeats a key); otherwise one by one.
    generations = sum(map(contains, payloads, repeat(_GENERATION)))
    present = _REQUIRED_KEYS * count + generations + sum(io_lens) + sentinels
    if text.count(b":") != present:
        return None
    for record, stream_id, identity in zip(records, stream_ids, identities, strict=True):
        record.stream_id = stream_id
        record.imei, record.device_id = identity
    return records


def _identities(imeis: Sequence[bytes]) -> list[tuple[str, int]] | None:
    """Each IMEI's text and number (remembered, as in _decode); None if one is invalid."""
    identities = []
    for imei in imeis:
        identity = _imeis.get(imei)
        if identity is None:
            if len(imei) != 15 or not imei.isdigit():
                return None
            identity = _remember(imei)
        identities.append(identity)
    return identities


def _decode_run_sentinels(braces: list[int], ios: list[dict[int, Any]]) -> bool:
    """:func:`_decode_io` of each IO map whose payload has ``braces`` "{" (more than two:
    it may hold sentinels), in place; False when one is bad (its entry is then decoded
    alone, which names the reason)."""
    for io, found in zip(ios, braces, strict=True):
        most = found - 2
        if most <= 0:
            continue
        for key, value in reversed(io.items()):
            if type(value) is _Sentinel:
                bigint, raw = value.bigint, value.raw
                if bigint is None and raw is not None:
                    io[key] = raw
                elif (
                    raw is None
                    and bigint is not None
                    and 0 < len(bigint) <= 20
                    and bigint.isascii()
                    and bigint.isdigit()
                    and (number := int(bigint)) <= MAX_U64
                ):
                    io[key] = number
                else:
                    return False
                most -= 1
                if not most:
                    break
    return True


def _has_duplicate_keys(payload: bytes, io_len: int, sentinels: int) -> bool:
    """True when an object of a decoded payload repeats a key (``"66"``/``"066"`` included).

    In a payload that decoded, every string is a key, a decimal or base64, so each colon
    separates a key from its value: when their count matches the keys the record has,
    none was repeated. Only otherwise (an escaped key name, a repeat) is it parsed again.
    """
    present = _REQUIRED_KEYS + (payload.rfind(b'"generation"') >= 0) + io_len + sentinels
    return payload.count(b":") != present and _repeats_keys(payload, io_len)


def _repeats_keys(payload: bytes, io_len: int) -> bool:
    """The exact check: any object with a repeated name, or io ids that collide as numbers."""
    repeated = False

    def pairs(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        nonlocal repeated
        repeated = repeated or len({key for key, _ in items}) != len(items)
        return items  # kept as pairs: the io object's own size stays visible

    try:
        top = json.loads(payload, object_pairs_hook=pairs)
    except ValueError:  # something msgspec accepted and json cannot read: not trusted
        return True
    io = dict(top).get("io") if isinstance(top, list) else None
    return repeated or (isinstance(io, list) and len(io) != io_len)


def _remember(imei: bytes) -> tuple[str, int]:
    """Cache a valid IMEI's text and number; the cache is emptied when it is full."""
    if len(_imeis) >= _IMEI_CACHE_SIZE:
        _imeis.clear()
    identity = _imeis[imei] = (imei.decode("ascii"), int(imei))
    return identity


def _decode_unusual(
    stream_id: str,
    fields: Mapping[bytes | str, bytes | str] | Mapping[bytes, bytes] | Mapping[str, str],
    max_bytes: int,
    max_io: int,
) -> Record | Rejection:
    """Entries not shaped like redis-py output: name exactly what is missing or extra."""
    entry = _as_bytes(fields)
    if isinstance(entry, Rejection):
        return entry
    size = sum(len(k) + len(v) for k, v in entry.items())
    if size > max_bytes:
        return Rejection(TOO_LARGE, f"entry is {size} bytes, limit {max_bytes}")
    if b"v" not in entry:
        return Rejection(MISSING_FIELD, "stream field 'v' is missing")
    if entry[b"v"] != CONTRACT_VERSION:
        return Rejection(UNSUPPORTED_VERSION, f"contract version {_show(entry[b'v'])} is not 1")
    extra = entry.keys() - _FIELDS
    if extra:
        names = ", ".join(sorted(_show(k) for k in extra))
        return Rejection(UNEXPECTED_FIELD, f"unexpected stream field(s): {names}")
    for name in (b"imei", b"payload"):
        if name not in entry:
            return Rejection(MISSING_FIELD, f"stream field {name.decode()!r} is missing")
    return _decode(stream_id, entry, max_bytes, max_io)


def _as_bytes(
    fields: Mapping[bytes | str, bytes | str] | Mapping[bytes, bytes] | Mapping[str, str],
) -> dict[bytes, bytes] | Rejection:
    out: dict[bytes, bytes] = {}
    for key, value in fields.items():
        k = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
        v = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        if not isinstance(k, bytes) or not isinstance(v, bytes):
            return Rejection(BAD_TYPE, "stream fields must be strings")
        out[k] = v
    return out


def _decode_io(io: dict[int, Any], most: int) -> Rejection | None:
    """Replace each sentinel in ``io`` by its value, in place; a rejection if one is bad.

    ``most`` bounds how many sentinels there can be. Ingestion writes 8-byte and
    variable-length elements last (Codec 8E order), so the scan runs from the end and
    stops once that many are found.
    """
    for key, value in reversed(io.items()):
        if type(value) is _Sentinel:
            decoded = _sentinel_value(key, value)
            if type(decoded) is Rejection:
                return decoded
            io[key] = decoded
            most -= 1
            if not most:
                break
    return None


def _sentinel_value(key: int, sentinel: _Sentinel) -> IoValue | Rejection:
    """The value a sentinel stands for ($bytes arrives base64-decoded by msgspec)."""
    bigint, raw = sentinel.bigint, sentinel.raw
    if raw is not None and bigint is None:
        return raw
    if bigint is None or raw is not None:
        return Rejection(BAD_SENTINEL, f"io {key}: a sentinel has exactly one key")
    if not (0 < len(bigint) <= 20 and bigint.isascii() and bigint.isdigit()):
        return Rejection(BAD_SENTINEL, f"io {key}: $bigint is not an unsigned decimal")
    value = int(bigint)
    if value > MAX_U64:
        return Rejection(OUT_OF_RANGE, f"io {key}: $bigint exceeds 64 bits")
    return value


def _classify(message: str) -> Rejection:
    """Turn a msgspec validation message into a reason code; the message is the detail."""
    if message.startswith("Object missing required field"):
        if "$.io" in message:
            return Rejection(BAD_SENTINEL, message)
        return Rejection(MISSING_FIELD, message)
    if "$.io[" in message and ("unknown field" in message or ".$" in message):
        return Rejection(BAD_SENTINEL, message)
    if message.startswith("Object contains unknown field"):
        return Rejection(UNEXPECTED_FIELD, message)
    if message.startswith("Number out of range") or any(
        op in message for op in (">=", "<=", "` >", "` <")
    ):
        return Rejection(OUT_OF_RANGE, message)
    return Rejection(BAD_TYPE, message)


def _show(raw: bytes) -> str:
    text = raw[:40].decode("utf-8", "backslashreplace")
    return repr(text + ("…" if len(raw) > 40 else ""))
