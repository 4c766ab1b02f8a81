"""Checks of an exported dataset: files readable, schema, partitions, duplicate rows.

A dataset is *clean* when every file reads with the export schema, every row sits in the
partition of its own UTC day, no stream entry appears twice and no ``(device_id, ts)``
appears twice. Rows sharing ``(device_id, ts)`` under different stream ids are device
resends (the stream itself carried them twice); ``allow_resends`` accepts those.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from processor.tools.export_files import PARTITION_PREFIX, data_files, temp_files
from processor.tools.export_schema import SCHEMA, split_by_day

_KEY_COLUMNS = ["device_id", "ts", "stream_id"]


@dataclass(slots=True)
class VerifyReport:
    """What :func:`verify_dataset` found."""

    files: int = 0
    rows: int = 0
    duplicate_keys: int = 0  # rows beyond the first per (device_id, ts)
    duplicate_entries: int = 0  # rows beyond the first per stream id: exported twice
    temp_files: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def resends(self) -> int:
        """Duplicate (device_id, ts) rows that are distinct stream entries."""
        return max(self.duplicate_keys - self.duplicate_entries, 0)

    def clean(self, *, allow_resends: bool = False) -> bool:
        """True when no file is bad and no row is duplicated (resends allowed if asked)."""
        duplicates = self.duplicate_entries if allow_resends else self.duplicate_keys
        return not self.problems and duplicates == 0

    def lines(self, *, allow_resends: bool = False) -> list[str]:
        """The report as text lines for an operator."""
        out = [
            f"files: {self.files}",
            f"rows: {self.rows}",
            f"duplicate (device_id, ts) rows: {self.duplicate_keys}"
            f" (same entry exported twice: {self.duplicate_entries},"
            f" device resends: {self.resends})",
            f"temporary files (interrupted writes, removed on next start): {self.temp_files}",
        ]
        out.extend(f"problem: {problem}" for problem in self.problems)
        out.append(f"clean: {'yes' if self.clean(allow_resends=allow_resends) else 'no'}")
        return out


def verify_dataset(root: Path) -> VerifyReport:
    """Read every data file under ``root`` and count rows, files and duplicates.

    Rows sharing ``(device_id, ts)`` share a day, so duplicates are counted one day
    directory at a time: memory follows the largest day, not the dataset.
    """
    report = VerifyReport(temp_files=len(temp_files(root)))
    if not root.is_dir():
        report.problems.append(f"{root} is not a directory")
        return report
    by_day: dict[Path, list[Path]] = {}
    for path in data_files(root):
        by_day.setdefault(path.parent, []).append(path)
    for paths in by_day.values():
        read = [_read_keys(path, report) for path in paths]
        keys = [table for table in read if table is not None]
        report.files += len(keys)
        report.rows += sum(table.num_rows for table in keys)
        if keys:
            _count_duplicates(pa.concat_tables(keys), report)
    return report


def _read_keys(path: Path, report: VerifyReport) -> pa.Table | None:
    """The file's key columns, or None (with a problem noted) when it is unusable."""
    try:
        schema = pq.read_schema(path)
        if not schema.equals(SCHEMA):
            report.problems.append(f"{path}: schema differs from the export schema")
            return None
        table = pq.read_table(path, columns=_KEY_COLUMNS)
    except (OSError, pa.ArrowException) as exc:
        report.problems.append(f"{path}: unreadable ({exc})")
        return None
    day = path.parent.name.removeprefix(PARTITION_PREFIX)
    misplaced = [d for d in split_by_day(table) if d != day]
    if misplaced:
        report.problems.append(f"{path}: rows of other days {misplaced[:3]}")
    return table.select(_KEY_COLUMNS)


def _count_duplicates(keys: pa.Table, report: VerifyReport) -> None:
    by_key = keys.group_by(["device_id", "ts"]).aggregate([([], "count_all")])
    report.duplicate_keys += _extra(by_key.column("count_all"))
    by_entry = keys.group_by(["stream_id"]).aggregate([([], "count_all")])
    report.duplicate_entries += _extra(by_entry.column("count_all"))


def _extra(counts: pa.ChunkedArray) -> int:
    """Rows beyond the first in each group."""
    total = pc.sum(counts).as_py() or 0
    return int(total) - len(counts)
