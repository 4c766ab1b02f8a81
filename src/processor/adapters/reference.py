"""Reference data in PostgreSQL: IO mapping seeds, devices, and the course file.

The course file (DOMAIN.md, "Course file and offline replay") is one event's configuration
as JSON. :func:`import_course` upserts it by natural keys, creating devices that are
missing; :func:`export_course` writes the same shape back with ids, in a stable order, so
import → export → import → export is byte-identical. Files are parsed here, with errors
that name the file and line (:class:`ReferenceFileError`); the CLI turns those into exit 2.
"""

from __future__ import annotations

import csv
from pathlib import Path

from processor.core.attributes import IoElement

DATA_DIR = Path(__file__).resolve().parents[3] / "data"
IO_CSV = DATA_DIR / "io-elements-fmb.csv"
SEEDED_MODELS: tuple[tuple[str, str], ...] = (("Teltonika", "FMB920"), ("Teltonika", "FMC130"))
IO_CSV_HEADER = ("io_id", "name", "bytes", "signed", "multiplier", "unit", "values")


class ReferenceFileError(Exception):
    """A reference file is missing or malformed; the message names the file and line."""


def read_io_csv(path: Path = IO_CSV) -> list[IoElement]:
    """Parse the FMB/FMC IO element table into mapping elements."""
    rows = _read_csv(path, IO_CSV_HEADER)
    elements = []
    for line, row in rows:
        try:
            elements.append(_io_element(row))
        except (ValueError, KeyError) as exc:
            raise ReferenceFileError(f"{path}:{line}: {exc}") from exc
    return elements


def _io_element(row: dict[str, str]) -> IoElement:
    signed = row["signed"].strip().lower()
    if signed not in {"true", "false"}:
        raise ValueError(f"signed must be true or false, got {row['signed']!r}")
    return IoElement.from_row(
        int(row["io_id"]),
        row["name"].strip(),
        size=int(row["bytes"]),
        signed=signed == "true",
        multiplier=float(row["multiplier"] or 1),
        offset=float(row.get("offset") or 0),
        unit=row["unit"].strip() or None,
        values=_csv_values(row["values"].strip()),
    )


def _csv_values(text: str) -> object:
    """``0=off;1=on`` → labels, ``ascii``/``hex`` as is; a range note like ``0..5`` → none."""
    if not text or "=" not in text:
        return text if text in {"ascii", "hex"} else None
    labels = {}
    for pair in text.split(";"):
        key, _, label = pair.partition("=")
        labels[str(int(key))] = label.strip()
    return labels


def _read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Rows with their line numbers; the header must name every required column."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ReferenceFileError(f"{path}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ReferenceFileError(f"{path}: cannot read: {exc}") from exc
    reader = csv.DictReader(text.splitlines())
    missing = [name for name in required if name not in (reader.fieldnames or [])]
    if missing:
        raise ReferenceFileError(f"{path}:1: header lacks column(s) {', '.join(missing)}")
    rows = []
    for row in reader:
        if None in row or any(value is None for value in row.values()):
            raise ReferenceFileError(f"{path}:{reader.line_num}: wrong number of columns")
        rows.append((reader.line_num, row))
    return rows
