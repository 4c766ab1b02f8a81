"""Native column builder of the analytics export (``_export_columns.c``)."""

from collections.abc import Sequence
from typing import Any

def export_columns(
    items: Sequence[Any], max_entry_bytes: int, max_io_elements: int
) -> tuple[int, tuple[bytes | None, ...], int, list[int]]: ...
def resp_scan(
    buffer: bytearray, end: int, pos: int, stack: tuple[int, ...]
) -> tuple[int, tuple[int, ...] | None]: ...
def export_reply(
    buffer: bytearray, end: int, max_entry_bytes: int, max_io_elements: int
) -> tuple[int, tuple[bytes | None, ...], int, list[int], list[list[Any]], bytes]: ...
