"""Decoded attributes: a device model's IO mapping turns raw IO elements into named values.

Pure and fast: a :class:`ModelMapping` compiles each element into a small decoder once,
so decoding a record is one dictionary walk. The rules (docs/directus.md):

- a signed element is read as two's complement of its byte size (1, 2, 4 or 8 bytes);
- an enum label from ``values`` wins over the number (labels are keyed by the signed,
  unscaled value, e.g. Dallas temperature ``3000`` is ``not_connected``, not 300.0 °C);
- otherwise the value is ``raw × multiplier + offset``, kept an exact ``int`` when both are
  integral (64-bit ICCIDs stay exact), else a float rounded to the multiplier's decimals;
- ``values = "ascii"`` decodes text (VIN), ``values = "hex"`` gives lowercase hex, and raw
  bytes arriving for a numeric element are hex as well;
- IO ids the mapping does not know are kept raw under their id (bytes as hex);
- a scaled integer beyond 64 bits becomes its decimal text (JSON readers would round it).

The hot path (:func:`attribute_rows`, :func:`encode_attributes`) writes the JSON straight
from a native plan with the C encoder of ``_speedups.c`` when the package was built with
it, and through :func:`decode_attributes` and msgspec otherwise; both write the same bytes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final, Literal

from processor.core.jsonenc import attributes_json, encode_json
from processor.core.records import IoValue, Record

try:
    from processor.core import _speedups as _native
except ImportError:  # built without a C compiler: the same results, in Python
    _native = None  # type: ignore[assignment]

NATIVE: Final = _native is not None

Attribute = int | float | str
Decoder = Callable[[IoValue], Attribute]
Encoding = Literal["number", "ascii", "hex"]

TEXT_ENCODINGS: Final = frozenset({"ascii", "hex"})

# Plan kinds: how decode_attributes treats an element (see compile_plan).
IDENTITY: Final = 0  # plain unsigned number
LABELS: Final = 1  # unsigned number with enum labels, no scaling
DIVIDE: Final = 2  # unsigned number divided by an integer (multiplier 0.1, 0.001, …)
CALL: Final = 3  # anything else: a compiled decoder function
Plan = tuple[str, int, Any]
# A plan compiled for the C encoder (an opaque capsule, see native_plan).
NativePlan = object
# A device's entry for attribute_rows: the native plan (or a Python encoder of an IO
# map), the mapping version, and whether the device is in ``devices``.
Encoder = Callable[[Mapping[int, IoValue]], bytes]
DeviceEntry = tuple[NativePlan | Encoder, int, bool]
AttributeRow = tuple[int, int, bytes, int]  # device_id, ts ms, attributes JSON, mapping version


@dataclass(frozen=True, slots=True)
class IoElement:
    """One row of ``io_mappings``: how to read one IO id of one device model."""

    io_id: int
    name: str
    size: int = 1  # the ``bytes`` column: 1, 2, 4, 8 or -1 (variable)
    signed: bool = False
    multiplier: float | Decimal = 1
    offset: float | Decimal = 0
    unit: str | None = None
    labels: Mapping[int, str] = field(default_factory=dict)
    encoding: Encoding = "number"

    @classmethod
    def from_row(
        cls,
        io_id: int,
        name: str,
        *,
        size: int,
        signed: bool,
        multiplier: float | Decimal,
        offset: float | Decimal,
        unit: str | None,
        values: object,
    ) -> IoElement:
        """Build from an ``io_mappings`` row (``values``: enum object, "ascii", "hex" or null)."""
        labels, encoding = parse_values(values)
        return cls(io_id, name, size, signed, multiplier, offset, unit, labels, encoding)

    def values_json(self) -> dict[str, str] | str | None:
        """The ``values`` column for this element (inverse of :func:`parse_values`)."""
        if self.encoding != "number":
            return self.encoding
        if self.labels:
            return {str(key): label for key, label in sorted(self.labels.items())}
        return None


def parse_values(values: object) -> tuple[dict[int, str], Encoding]:
    """Split a ``values`` JSON value into enum labels and an encoding; raise on junk."""
    if values is None or values == {}:
        return {}, "number"
    if isinstance(values, str) and values in TEXT_ENCODINGS:
        return {}, values  # type: ignore[return-value]
    if isinstance(values, Mapping):
        try:
            return {int(key): str(label) for key, label in values.items()}, "number"
        except ValueError as exc:
            raise ValueError(f"enum label keys must be integers: {values!r}") from exc
    raise ValueError(f"values must be an object of labels, 'ascii', 'hex' or null: {values!r}")


@dataclass(frozen=True, slots=True)
class ModelMapping:
    """A device model's IO mapping, compiled; ``version`` identifies its exact content."""

    model: str
    elements: Mapping[int, IoElement]
    version: int
    plans: Mapping[int, Plan]
    native: NativePlan | None = None  # None: not built with C, or see native_plan

    @classmethod
    def build(cls, model: str, elements: Iterable[IoElement]) -> ModelMapping:
        """Compile the elements of one model (a later duplicate io_id wins)."""
        by_id = {element.io_id: element for element in elements}
        plans = {io_id: compile_plan(el) for io_id, el in by_id.items()}
        version = mapping_version(by_id.values())
        return cls(model, by_id, version, plans, native_plan(plans))

    def encoder(self) -> NativePlan | Encoder:
        """What :func:`attribute_rows` encodes this model's IO maps with."""
        if self.native is not None:  # compiled only when the C encoder is built
            return self.native
        return lambda io: attributes_json(decode_attributes(io, self))


def native_plan(plans: Mapping[int, Plan]) -> NativePlan | None:
    """The plans compiled for the C encoder, or None (built without it, or its output
    could differ).

    The encoder writes one JSON member per IO element, where the Python path assigns into
    a dict: two elements of one name, or a name that an unknown IO id's number could
    repeat, would give a repeated key there and one key here. Its plan is
    ``{io_id: (b'"name":', kind, argument)}``, enum labels as JSON texts.
    """
    if _native is None:
        return None
    names = [name for name, _, _ in plans.values()]
    if len(set(names)) != len(names) or any(_NUMERIC.fullmatch(name) for name in names):
        return None
    if any(not 0 <= io_id < 2**31 for io_id in plans):  # ids the encoder's table takes
        return None
    native: dict[int, tuple[bytes, int, Any]] = {}
    for io_id, (name, kind, arg) in plans.items():
        labels = (
            {value: encode_json(label) for value, label in arg.items()} if kind == LABELS else None
        )
        native[io_id] = (encode_json(name) + b":", kind, arg if labels is None else labels)
    return _native.compile(native)


_NUMERIC: Final = re.compile(r"-?[0-9]+")


def mapping_version(elements: Iterable[IoElement]) -> int:
    """A stable positive 31-bit id of a mapping's content (same rows → same number)."""
    digest = hashlib.sha256()
    for el in sorted(elements, key=lambda item: item.io_id):
        row = (el.io_id, el.name, el.size, el.signed, str(el.multiplier), str(el.offset))
        digest.update(repr((*row, el.unit, sorted(el.labels.items()), el.encoding)).encode())
    return int.from_bytes(digest.digest()[:4], "big") & 0x7FFF_FFFF


def decode_attributes(io: Mapping[int, IoValue], mapping: ModelMapping) -> dict[str, object]:
    """Turn one record's raw IO elements into named attributes with ``mapping``."""
    out: dict[str, object] = {}
    plans = mapping.plans
    for io_id, value in io.items():
        plan = plans.get(io_id)
        if plan is None:
            out[str(io_id)] = value.hex() if type(value) is bytes else value
            continue
        name, kind, arg = plan
        # The common kinds are inlined: a Python call per element would double the cost.
        if kind == CALL:
            out[name] = arg(value)
        elif type(value) is bytes:
            out[name] = value.hex()
        elif kind == IDENTITY:
            out[name] = value
        elif kind == LABELS:
            out[name] = arg.get(value, value)
        else:
            out[name] = value / arg
    return out


def encode_attributes(io: Mapping[int, IoValue], mapping: ModelMapping) -> bytes:
    """The attributes JSON of one record: ``attributes_json(decode_attributes(io, mapping))``."""
    if mapping.native is not None:  # compiled only when the C encoder is built
        return _native.encode_attributes(io, mapping.native)
    return attributes_json(decode_attributes(io, mapping))


def attribute_rows(
    records: Sequence[Record],
    entries: dict[int, DeviceEntry],
    resolve: Callable[[int], DeviceEntry],
) -> tuple[list[AttributeRow], int]:
    """The attribute rows of ``records`` and how many are of devices not in ``devices``.

    ``entries`` caches each device's entry; a device missing from it is looked up with
    ``resolve`` and added.
    """
    if _native is not None:
        return _native.attribute_rows(records, entries, resolve)
    return attribute_rows_py(records, entries, resolve)


def attribute_rows_py(
    records: Sequence[Record],
    entries: dict[int, DeviceEntry],
    resolve: Callable[[int], DeviceEntry],
) -> tuple[list[AttributeRow], int]:
    """:func:`attribute_rows` in Python (entries hold Python encoders, no native plans)."""
    rows: list[AttributeRow] = []
    unknown = 0
    for record in records:
        device_id = record.device_id
        entry = entries.get(device_id)
        if entry is None:
            entry = entries[device_id] = resolve(device_id)
        encoder, version, known = entry
        if not known:
            unknown += 1
        if not callable(encoder):  # ModelMapping.encoder gives plans only when built
            raise TypeError("a native plan needs the C encoder")
        rows.append((device_id, record.ts, encoder(record.io), version))
    return rows, unknown


def compile_plan(element: IoElement) -> Plan:
    """How :func:`decode_attributes` decodes one element: (name, kind, argument)."""
    name = element.name
    if element.encoding == "number" and not (element.signed and element.size > 0):
        m, o = Decimal(str(element.multiplier)), Decimal(str(element.offset))
        if m == 1 and o == 0:
            return (
                (name, LABELS, dict(element.labels)) if element.labels else (name, IDENTITY, None)
            )
        divisor = 1 / m if m > 0 else Decimal(0)
        if not element.labels and o == 0 and divisor > 1 and divisor == divisor.to_integral_value():
            # value / 1000 is the double nearest the exact decimal (12850 → 12.85).
            return (name, DIVIDE, int(divisor))
    decoder = compile_decoder(element)
    return (name, IDENTITY, None) if decoder is None else (name, CALL, decoder)


def compile_decoder(element: IoElement) -> Decoder | None:
    """The function decoding one element's raw value, or ``None`` when it is the identity."""
    if element.encoding == "ascii":
        return _ascii_decoder(element.size)
    if element.encoding == "hex":
        return _hex_decoder(element.size)
    return _number_decoder(element)


def _as_bytes(value: IoValue, size: int) -> bytes:
    if type(value) is bytes:
        return value
    assert isinstance(value, int)
    # Padded to the element's size; a value wider than the mapping says (a mapping row
    # with too small a `bytes`) keeps all its bytes rather than failing the batch.
    return value.to_bytes(max(size, 1, (value.bit_length() + 7) // 8), "big")


def _ascii_decoder(size: int) -> Decoder:
    def decode(value: IoValue) -> str:
        # Devices pad fixed-size text with NULs; anything not ASCII is shown, not dropped.
        # A NUL inside cannot be stored (PostgreSQL text and jsonb refuse \u0000): shown too.
        text = _as_bytes(value, size).rstrip(b"\x00").decode("ascii", errors="replace")
        return text.replace("\x00", "\ufffd")

    return decode


def _hex_decoder(size: int) -> Decoder:
    def decode(value: IoValue) -> str:
        return _as_bytes(value, size).hex()

    return decode


def _number_decoder(element: IoElement) -> Decoder | None:
    bits = element.size * 8 if element.signed and element.size > 0 else 0
    labels = dict(element.labels)
    scale = _scaler(element.multiplier, element.offset)
    if not bits and not labels and scale is None:
        return None
    half, full = (1 << (bits - 1), 1 << bits) if bits else (0, 0)

    def decode(value: IoValue) -> Attribute:
        if type(value) is bytes:
            return value.hex()
        assert isinstance(value, int)
        if bits and value >= half:
            value -= full
        if labels:
            label = labels.get(value)
            if label is not None:
                return label
        return value if scale is None else scale(value)

    return decode


def _scaler(
    multiplier: float | Decimal, offset: float | Decimal
) -> Callable[[int], Attribute] | None:
    m, o = Decimal(str(multiplier)), Decimal(str(offset))
    if m == 1 and o == 0:
        return None
    if m == m.to_integral_value() and o == o.to_integral_value():
        im, io = int(m), int(o)
        return lambda value: _json_int(value * im + io)
    # Round to the decimals the multiplier and offset carry, so 12850 × 0.001 is 12.85,
    # not 12.850000000000001; the float product is within one ulp of the exact value.
    places = max(-_exponent(m), -_exponent(o), 0)
    fm, fo = float(m), float(o)
    return lambda value: round(value * fm + fo, places)


def _json_int(value: int) -> int | str:
    """An integer JSON readers take exactly, or its decimal text beyond 64 bits."""
    return value if -(2**63) <= value < 2**64 else str(value)


def _exponent(number: Decimal) -> int:
    exponent = number.normalize().as_tuple().exponent
    return exponent if isinstance(exponent, int) else 0
