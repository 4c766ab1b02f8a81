"""Analytics export throughput, beside pyarrow writing the same rows prebuilt in memory.

Run: ``python -m benchmarks.export_bench [--count N] [--max-rows R] [--workers 0,2,3]
[--repeat K]`` with Redis at ``PROCESSOR_REDIS_URL`` (default 127.0.0.1:6379). The entries
are pre-loaded into a stream of their own; the export runs in burst mode and is timed
from its first read to its last file renamed (XREADGROUP, decode, Arrow columns, Parquet
zstd, fsync, rename, XACK all included). The same-run references write the very same
rows, decoded beforehand, through the export's own file writing: the same batch
boundaries, row groups (written ahead), compression and fsync+rename. Every path is run
``K`` times (default 5) and its best run reported, the export's and the references' alike,
the paths taking turns (export runs, then each reference twice in a row, ``K`` times
over): one run lasts a second or less, so a single run says more about the machine's
other load than about the code, and a slow spell of the machine falls on every path
alike. A reference's second run in a row finds its memory warm, as back-to-back runs do.

- ``pyarrow write (tables prebuilt)``: Arrow tables already built, only Parquet writing;
- ``pyarrow write (column lists prebuilt)``: Python column lists → Arrow → Parquet.

Targets: ≥ 100,000 records/s, and ≥ 0.5 of pyarrow writing "the same rows prebuilt in
memory". That ratio is judged against the column-lists reference: rows held in memory as
Python values, which pyarrow converts and writes, is what "rows prebuilt in memory" says.
The prebuilt-tables reference (Arrow already built, only the Parquet write timed) is the
stricter ceiling; its ratio is printed on the same line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pyarrow as pa
import redis

from benchmarks.common import make_entries, print_table
from processor.core.contract import decode_entry
from processor.core.gc_tuning import tune_for_throughput
from processor.core.jsonenc import io_json
from processor.core.records import Record
from processor.logs import configure_logging
from processor.settings import Settings, load_settings
from processor.tools.export import WRITE_AHEAD_PARTS, run_export
from processor.tools.export_files import Dataset
from processor.tools.export_schema import SCHEMA, records_to_batch, split_by_day

TARGET_RATE = 100_000
TARGET_RATIO = 0.5
REDIS_URL = os.environ.get("PROCESSOR_REDIS_URL", "redis://127.0.0.1:6379/0")


def load_stream(client: redis.Redis, stream: str, entries: list[dict[bytes, bytes]]) -> None:
    """XADD every entry (pipelined, not timed)."""
    for start in range(0, len(entries), 10_000):
        pipe = client.pipeline(transaction=False)
        for fields in entries[start : start + 10_000]:
            pipe.xadd(stream, fields)  # type: ignore[arg-type]
        pipe.execute()


Rate = tuple[float, int, float, float, float]


class WorkerCpu:
    """CPU seconds of this process's children (the decode workers), sampled every 20 ms
    while an export runs, so that their CPU between two moments can be read off (their
    start-up, before the export's first read, left out). The children are looked for
    every 0.25 s, their CPU read every sample (one small /proc read each)."""

    def __init__(self) -> None:
        self._samples: list[tuple[float, float]] = []  # (perf_counter, CPU seconds so far)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> WorkerCpu:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        me = psutil.Process()
        children: dict[int, psutil.Process] = {}
        last: dict[int, float] = {}
        looked = 0.0
        while not self._stop.is_set():
            now = time.perf_counter()
            if now - looked >= 0.25:
                children.update((child.pid, child) for child in me.children(recursive=True))
                looked = now
            for pid, child in children.items():
                with contextlib.suppress(psutil.Error):  # exited meanwhile: its last value
                    times = child.cpu_times()
                    last[pid] = times.user + times.system
            self._samples.append((time.perf_counter(), sum(last.values())))
            time.sleep(0.02)

    def between(self, start: float, end: float) -> float:
        """CPU seconds the children used from ``start`` to ``end`` (interpolated)."""
        return self._at(end) - self._at(start)

    def _at(self, moment: float) -> float:
        samples = self._samples
        after = next((n for n, (at, _) in enumerate(samples) if at >= moment), len(samples))
        if after == 0 or after == len(samples):
            return samples[min(after, len(samples) - 1)][1] if samples else 0.0
        (t0, v0), (t1, v1) = samples[after - 1], samples[after]
        return v0 + (v1 - v0) * (moment - t0) / (t1 - t0)


def export_rate(settings: Settings, out: Path, count: int, client: redis.Redis) -> Rate:
    """Records/s of one burst export (first read to last rename), files written, and the
    CPU time per record in µs of the exporter process, of its decode workers (from the
    first read to the last rename: their start-up is not included) and of the Redis
    server (all its clients: the figure includes whatever else uses that server)."""
    cpu = time.process_time()
    server = _redis_cpu(client)
    with WorkerCpu() as workers:
        stats = asyncio.run(run_export(settings, out, burst=True, handle_signals=False))
    cpu_us = (time.process_time() - cpu) / count * 1e6
    workers_us = workers.between(stats.first_read_at, stats.last_rename_at) / count * 1e6
    redis_us = (_redis_cpu(client) - server) / count * 1e6
    assert stats.rows == count, f"exported {stats.rows} of {count}"
    rate = count / (stats.last_rename_at - stats.first_read_at)
    return rate, stats.files, cpu_us, workers_us, redis_us


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def prebuilt_records(entries: list[dict[bytes, bytes]]) -> list[Record]:
    records = [decode_entry(f"{1 + i}-0", e) for i, e in enumerate(entries)]
    assert all(type(r) is Record for r in records)
    return records  # type: ignore[return-value]


def write_tables(out: Path, tables: list[pa.Table], row_group: int) -> None:
    """Write each table as one batch exactly as the export writes one: row groups of
    ``row_group`` rows written ahead into temporary files, then closed, fsynced, renamed."""
    with Dataset(out) as dataset:
        for n, table in enumerate(tables):
            files = dataset.batch_files()
            for start in range(0, table.num_rows, row_group):
                files.append(split_by_day(table.slice(start, row_group)))
            dataset.commit_batch(f"{n + 1}-0", files)


def column_lists(records: list[Record]) -> list[dict[str, list[object]]]:
    """Per-batch Python column lists (what a row-less exporter would hold)."""
    names = [f.name for f in SCHEMA]
    cols: dict[str, list[object]] = {name: [] for name in names}
    for r in records:
        for name in names:
            cols[name].append(io_json(r.io) if name == "io" else getattr(r, name))
    return [cols]


class References:
    """pyarrow writing the rows prebuilt in memory, in the export's batches and row groups:
    as Arrow tables, and as Python column lists. Each :meth:`run` times both once."""

    def __init__(self, records: list[Record], max_rows: int, out: Path) -> None:
        chunks = [records[i : i + max_rows] for i in range(0, len(records), max_rows)]
        self.count = len(records)
        self.row_group = max(1, max_rows // WRITE_AHEAD_PARTS)
        self.tables = [pa.Table.from_batches([records_to_batch(c)]) for c in chunks]
        self.lists = [column_lists(c)[0] for c in chunks]
        self.out = out
        self.tables_rate = self.lists_rate = 0.0  # the best run of each

    def run(self, run: int) -> None:
        start = time.perf_counter()
        write_tables(self.out / f"tables-{run}", self.tables, self.row_group)
        self.tables_rate = max(self.tables_rate, self.count / (time.perf_counter() - start))
        start = time.perf_counter()
        built = [
            pa.table({f.name: pa.array(c[f.name], type=f.type) for f in SCHEMA}) for c in self.lists
        ]
        write_tables(self.out / f"lists-{run}", built, self.row_group)
        self.lists_rate = max(self.lists_rate, self.count / (time.perf_counter() - start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--max-rows", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=1_000)
    parser.add_argument(
        "--workers",
        type=lambda text: [int(w) for w in text.split(",")],
        default=[0, 2, 3],
        help="decode worker counts to run, comma-separated (0 = in process)",
    )
    parser.add_argument(
        "--mix",
        choices=("sentinels", "plain"),
        default="sentinels",
        help="IO of every record: 15 plain elements plus one $bigint and one $bytes (the"
        " default, the heavier decode) or the 15 plain elements of the pipeline benchmark",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="runs of each export and each reference, in turns; the best of each is reported",
    )
    args = parser.parse_args()
    configure_logging("console", "warning")
    tune_for_throughput()  # as `processor export` does

    load_before = os.getloadavg()[0]
    entries = make_entries(args.count, devices=args.devices, sentinels=args.mix == "sentinels")
    prefix = f"bench:export:{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(REDIS_URL)
    work = Path(tempfile.mkdtemp(prefix="export-bench-"))
    rates: dict[int, Rate] = {}
    try:
        load_stream(client, f"{prefix}:records", entries)
        references = References(prebuilt_records(entries), args.max_rows, work)
        # One consumer group per run, same pre-loaded stream; the worker counts and the
        # references take turns, so that a slower spell of the machine does not fall on
        # one of them only.
        for run in range(args.repeat):
            # Twice in a row: the second run finds pyarrow's and the allocator's memory
            # warm, as back-to-back runs do (a first run converts the lists ~40 % slower).
            references.run(2 * run)
            references.run(2 * run + 1)
            for workers in args.workers:
                settings = load_settings(
                    redis_url=REDIS_URL,
                    stream=f"{prefix}:records",
                    dead_letter_stream=f"{prefix}:dead",
                    export_group=f"bench-{workers}-{run}",
                    consumer="bench",
                    export_max_rows=args.max_rows,
                    export_workers=workers,
                    log_level="warning",
                )
                out = work / f"export-{workers}-{run}"
                measured = export_rate(settings, out, args.count, client)
                if workers not in rates or measured[0] > rates[workers][0]:
                    rates[workers] = measured
                shutil.rmtree(out, ignore_errors=True)
        tables_rate, lists_rate = references.tables_rate, references.lists_rate
    finally:
        client.delete(f"{prefix}:records", f"{prefix}:records:empty", f"{prefix}:dead")
        client.close()
        shutil.rmtree(work, ignore_errors=True)

    row_group = args.max_rows // WRITE_AHEAD_PARTS
    print(
        f"{args.count:,} entries ({args.mix} IO mix), {args.devices:,} devices, "
        f"batches of {args.max_rows:,} rows in row groups of {row_group:,},"
    )
    print(
        f"zstd, fsync + rename. Best of {args.repeat} runs of each path, taking turns (CPU figures"
        " of that run); same-run references below; ratios are export / reference."
    )
    rows: list[list[object]] = []
    for workers, (rate, files, cpu_us, workers_us, redis_us) in rates.items():
        name = f"export, {workers} decode workers" if workers else "export, decoding in process"
        cells = [rate, files, cpu_us, workers_us if workers else "", redis_us]
        rows.append([name, *cells, rate / tables_rate, rate / lists_rate])
    rows.append(
        ["pyarrow write (tables prebuilt)", tables_rate, *("",) * 4, 1.0, tables_rate / lists_rate]
    )
    rows.append(
        [
            "pyarrow write (column lists prebuilt)",
            lists_rate,
            *("",) * 4,
            lists_rate / tables_rate,
            1.0,
        ]
    )
    headers = [
        "path",
        "records/s",
        "files",
        "main CPU µs/rec",
        "workers CPU µs/rec",
        "Redis CPU µs/rec",
        "/ tables ceiling",
        "/ column lists",
    ]
    print_table(headers, rows)
    print(
        f"load average (1 min) before the run: {load_before:.1f}, after: {os.getloadavg()[0]:.1f}"
        f" on {os.cpu_count()} cores"
    )
    rate = max(r for r, *_ in rates.values())
    ratio, strict = rate / lists_rate, rate / tables_rate
    print(
        f"target ≥ {TARGET_RATE:,} records/s: {'met' if rate >= TARGET_RATE else 'NOT met'}"
        f" (best {rate:,.0f}); target ≥ {TARGET_RATIO} × pyarrow writing the rows prebuilt in"
        f" memory, judged against the column-lists reference (the rows as Python values,"
        f" converted and written by pyarrow): {'met' if ratio >= TARGET_RATIO else 'NOT met'}"
        f" ({ratio:.2f}); against the stricter prebuilt-tables reference (Parquet write"
        f" only): {'met' if strict >= TARGET_RATIO else 'NOT met'} ({strict:.2f})"
    )


if __name__ == "__main__":
    main()
