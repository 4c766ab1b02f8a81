"""The export's dataset directory: day partitions, atomic file replacement, one writer.

Layout: ``DIR/date=YYYY-MM-DD/part-<first stream id>.parquet``. A batch's files are
written under a temporary name, fsynced, renamed over any earlier file of the same name
and their directories fsynced; only then may the caller acknowledge the batch. Writing a
batch also removes files of the same name in days the batch no longer covers, so after a
re-delivered batch is written the dataset holds exactly its rows under its name.
``DIR/.lock`` (flock) keeps a second exporter out of the same directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from processor.tools.export_schema import SCHEMA

PARTITION_PREFIX: Final = "date="
FILE_PREFIX: Final = "part-"
FILE_SUFFIX: Final = ".parquet"
TMP_SUFFIX: Final = ".tmp"
LOCK_NAME: Final = ".lock"
CONSUMER_NAME: Final = "_consumer"
COMPRESSION: Final = "zstd"
# Dictionary pages only for columns with few distinct values per file (a dictionary built
# for ids, times, positions or IO texts is thrown away after costing CPU), and no min/max
# statistics for the long ``io`` texts (nobody filters on them).
DICTIONARY_COLUMNS: Final = [
    "imei",
    "device_id",
    "alt",
    "angle",
    "sat",
    "speed",
    "priority",
    "event_io",
    "codec",
    "generation",
]
STATISTICS_COLUMNS: Final = [field.name for field in SCHEMA if field.name != "io"]
WRITE_OPTIONS: Final[dict[str, Any]] = {
    "compression": COMPRESSION,
    "use_dictionary": DICTIONARY_COLUMNS,
    "write_statistics": STATISTICS_COLUMNS,
}


class DatasetError(Exception):
    """The dataset directory cannot be used or written (disk, permissions, lock)."""


class DiskFullError(DatasetError):
    """The dataset's filesystem is full (or over quota): writing may succeed later."""


_DISK_FULL: Final = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(exc: OSError) -> bool:
    # pyarrow raises OSError without errno, its message naming it: "[errno 28] ...".
    return exc.errno in _DISK_FULL or any(f"[errno {n}]" in str(exc) for n in _DISK_FULL)


def file_name(first_id: str) -> str:
    """The name of a batch's files: ``part-<first stream id>.parquet``."""
    return f"{FILE_PREFIX}{first_id}{FILE_SUFFIX}"


def first_id_of(path: Path) -> str | None:
    """The first stream id a data file is named after, or None for any other file."""
    name = path.name
    if not (name.startswith(FILE_PREFIX) and name.endswith(FILE_SUFFIX)):
        return None
    return name[len(FILE_PREFIX) : -len(FILE_SUFFIX)]


def data_files(root: Path) -> list[Path]:
    """Every finished Parquet file of the dataset, in a stable order."""
    return sorted(root.glob(f"{PARTITION_PREFIX}*/{FILE_PREFIX}*{FILE_SUFFIX}"))


def temp_files(root: Path) -> list[Path]:
    """Files left half-written by an interrupted exporter."""
    return sorted(root.glob(f"{PARTITION_PREFIX}*/.*{TMP_SUFFIX}"))


@dataclass(frozen=True, slots=True)
class WrittenBatch:
    """The files a batch left: written paths, and how many earlier files it rewrote."""

    paths: list[Path]
    replaced: int = 0  # files of an earlier, unacknowledged delivery renamed over
    removed: int = 0  # files of an earlier delivery in days this one no longer has


class Dataset:
    """The one writer of a dataset directory (hold it with ``with Dataset(root) as ds``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock: TextIO | None = None

    def __enter__(self) -> Dataset:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Create the directory, take the writer lock, remove leftover temporary files."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = (self.root / LOCK_NAME).open("a", encoding="utf-8")
        except OSError as exc:
            raise DatasetError(f"cannot open {self.root}: {exc.strerror}") from exc
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            lock.close()
            raise DatasetError(f"{self.root} is being written by another exporter") from exc
        self._lock = lock
        for leftover in temp_files(self.root):  # ours: nobody else holds the lock
            leftover.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the writer lock."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def consumer_name(self) -> str:
        """This dataset's consumer name in the group, created once and kept in the directory.

        A stable name is what lets a restarted exporter re-read its own pending entries
        first (and so rewrite an unacknowledged batch under the same file name).
        """
        path = self.root / CONSUMER_NAME
        try:
            return path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            name = f"export-{socket.gethostname()}-{secrets.token_hex(3)}"
            _write_durably(path, name.encode("utf-8"))
            return name
        except OSError as exc:
            raise DatasetError(f"cannot read {path}: {exc.strerror}") from exc

    def write_batch(self, first_id: str, tables: dict[str, pa.Table]) -> WrittenBatch:
        """Durably write one batch's day tables as ``date=<day>/part-<first_id>.parquet``.

        When this returns, every file is renamed into place and its directory entry is on
        disk, and no other day holds a file of this name.
        """
        name = file_name(first_id)
        try:
            existing = {p for p in self._partitions() if (p / name).exists()}
            written = [self._write_file(day, name, table) for day, table in tables.items()]
            removed = self._remove_stale(name, existing - {path.parent for path in written})
        except OSError as exc:
            error = DiskFullError if _disk_full(exc) else DatasetError
            raise error(f"cannot write batch {name}: {exc.strerror or exc}") from exc
        return WrittenBatch(written, replaced=len(existing) - removed, removed=removed)

    def discard(self, paths: list[Path]) -> None:
        """Delete data files durably (files of batches that were never acknowledged)."""
        try:
            for path in paths:
                path.unlink(missing_ok=True)
                _fsync_dir(path.parent)
        except OSError as exc:
            raise DatasetError(f"cannot remove {path}: {exc.strerror}") from exc

    def commit_batch(self, first_id: str, files: BatchFiles) -> WrittenBatch:
        """Durably put the files written ahead in place as ``part-<first_id>.parquet``.

        The same as :meth:`write_batch` with the files' rows, which they already hold. On
        failure the caller discards ``files`` and writes the batch with :meth:`write_batch`.
        """
        name = file_name(first_id)
        try:
            existing = {p for p in self._partitions() if (p / name).exists()}
            written = [_install(temp, temp.parent / name) for temp in files.close()]
            removed = self._remove_stale(name, existing - {path.parent for path in written})
        except OSError as exc:
            error = DiskFullError if _disk_full(exc) else DatasetError
            raise error(f"cannot write batch {name}: {exc.strerror or exc}") from exc
        return WrittenBatch(written, replaced=len(existing) - removed, removed=removed)

    def batch_files(self) -> BatchFiles:
        """Files for a batch's rows written ahead, a row group at a time (see BatchFiles)."""
        return BatchFiles(self)

    def day_directory(self, day: str) -> Path:
        """``DIR/date=<day>``, created (durably) if missing."""
        directory = self.root / f"{PARTITION_PREFIX}{day}"
        if not directory.is_dir():
            directory.mkdir(exist_ok=True)
            _fsync_dir(self.root)
        return directory

    def _write_file(self, day: str, name: str, table: pa.Table) -> Path:
        directory = self.day_directory(day)
        temp = directory / f".{name}{TMP_SUFFIX}"
        try:
            pq.write_table(table, temp, **WRITE_OPTIONS)
        except OSError:
            temp.unlink(missing_ok=True)  # a partial file must not hold the space it took
            raise
        return _install(temp, directory / name)

    def _remove_stale(self, name: str, directories: set[Path]) -> int:
        for directory in directories:
            (directory / name).unlink()
            _fsync_dir(directory)
        return len(directories)

    def _partitions(self) -> Iterator[Path]:
        return (p for p in self.root.glob(f"{PARTITION_PREFIX}*") if p.is_dir())


class BatchFiles:
    """A batch's day files, written while the batch is still being read.

    Each :meth:`append` adds a row group to the file of each day it has rows for, under a
    temporary name of its own (``.batch-<random>.parquet.tmp``, removed by the next start
    if the exporter dies); :meth:`Dataset.commit_batch` closes, syncs and renames them.
    Used from one thread at a time.
    """

    def __init__(self, dataset: Dataset) -> None:
        self._dataset = dataset
        self._tag = secrets.token_hex(6)
        self._writers: dict[Path, pq.ParquetWriter] = {}  # by temporary path
        self._days: dict[str, Path] = {}

    def append(self, tables: dict[str, pa.Table]) -> None:
        """Write each day's rows as one more row group of that day's file."""
        try:
            for day, table in tables.items():
                temp = self._days.get(day)
                if temp is None:
                    directory = self._dataset.day_directory(day)
                    temp = directory / f".batch-{self._tag}{FILE_SUFFIX}{TMP_SUFFIX}"
                    self._writers[temp] = pq.ParquetWriter(temp, table.schema, **WRITE_OPTIONS)
                    self._days[day] = temp
                self._writers[temp].write_table(table)
        except OSError as exc:
            error = DiskFullError if _disk_full(exc) else DatasetError
            raise error(f"cannot write ahead: {exc.strerror or exc}") from exc

    def close(self) -> list[Path]:
        """Finish every file (footer written); their temporary paths."""
        for writer in self._writers.values():
            writer.close()
        return list(self._writers)

    def discard(self) -> None:
        """Close and delete the files (a write failed: the batch is written again whole)."""
        for temp, writer in self._writers.items():
            with contextlib.suppress(Exception):
                writer.close()
            temp.unlink(missing_ok=True)
        self._writers.clear()
        self._days.clear()


def _install(temp: Path, final: Path) -> Path:
    """fsync ``temp``, rename it over ``final``, fsync the directory (the file is durable)."""
    try:
        _fsync_path(temp)
        temp.replace(final)
    except OSError:
        temp.unlink(missing_ok=True)  # a partial file must not hold the space it took
        raise
    _fsync_dir(final.parent)
    return final


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    temp.write_bytes(data)
    _fsync_path(temp)
    temp.replace(path)
    _fsync_dir(path.parent)
