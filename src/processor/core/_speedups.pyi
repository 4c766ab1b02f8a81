"""Native encoders for the attribute path (``_speedups.c``); see attributes.py."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from processor.core.records import IoValue, Record

def compile(plan: Mapping[int, tuple[bytes, int, Any]]) -> object: ...
def encode_attributes(io: Mapping[int, IoValue], plan: object) -> bytes: ...
def attribute_rows(
    records: Sequence[Record],
    entries: dict[int, Any],
    resolve: Callable[[int], Any],
) -> tuple[list[tuple[int, int, bytes, int]], int]: ...
def attribute_copy(rows: Sequence[tuple[int, int, bytes, int]]) -> bytes: ...
def attribute_copy_records(
    records: Sequence[Record],
    entries: dict[int, Any],
    resolve: Callable[[int], Any],
) -> tuple[bytes, int]: ...
def resp_bulks(text: bytes) -> tuple[int, bytes]: ...
