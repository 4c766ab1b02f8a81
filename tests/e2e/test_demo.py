"""The README's main-job command, run as a new user would: ``make demo``, unattended.

No fixtures and no shortcuts: the exact command from the repository root, with no
PROCESSOR_* variable set (devservices finds or starts the servers), as a subprocess.
It must exit 0 and print a final leaderboard with finished entries. Fast tests of the
view and the child supervision it relies on come first.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console

from processor.tools.demo_procs import Child, ChildError, stop_all
from processor.tools.demo_view import (
    Alert,
    Pipeline,
    Snapshot,
    Standing,
    clock,
    leaderboard_table,
    parse_metrics,
    plain_snapshot,
)

ROOT = Path(__file__).resolve().parents[2]
DURATION_S = 90  # at the default x20, the whole field of 50 has started by ~80 s
COMMAND = ["make", "demo", f"ARGS=--duration {DURATION_S}"]
TIME = re.compile(r"\b\d+:\d\d\.\d\b")


def _final_leaderboard(output: str) -> list[str]:
    """The rows of the final leaderboard table (everything after its title)."""
    _head, found, rest = output.partition("Final leaderboard")
    assert found, f"no final leaderboard printed:\n{output[-3000:]}"
    return [line for line in rest.splitlines() if line.strip()]


def _finished_rows(rows: list[str]) -> list[str]:
    """Rows of status finished that show a rank and a time."""
    out = []
    for row in rows:
        cells = row.split()
        if "finished" in cells and cells[0].isdigit() and TIME.search(row):
            out.append(row)
    return out


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_make_demo_runs_a_race_to_a_leaderboard_with_finishers() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCESSOR_")}
    done = subprocess.run(
        COMMAND, cwd=ROOT, env=env, capture_output=True, text=True, timeout=380, check=False
    )
    output = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{output[-3000:]}\n{done.stderr[-3000:]}"
    finished = _finished_rows(_final_leaderboard(output))
    assert len(finished) >= 10, f"few finished entries:\n{output[-5000:]}"
    assert finished[0].split()[0] == "1", finished[0]


# -- the pieces ----------------------------------------------------------------------------

STANDINGS = (
    Standing(1, 11, "Sami Horvat", "T1", "finished", 412_100, 0, 412_100, 0),
    Standing(2, 1, "Ines Horvat", "T1", "finished", 388_100, 120_000, 508_100, 96_000),
    Standing(None, 3, "Marta Berg", "T4", "running", None, None, None, None),
    Standing(None, 40, "Ana Novak", "M", "not_started", None, None, None, None),
)


def test_clock_formats_minutes_and_hours() -> None:
    assert clock(412_100) == "6:52.1"
    assert clock(3_723_440) == "1:02:03.4"
    assert clock(0) == "0:00.0"
    assert clock(None) == "-"


def test_printed_leaderboard_is_what_the_end_to_end_test_reads() -> None:
    out = io.StringIO()
    Console(file=out, width=120, highlight=False).print(
        leaderboard_table(STANDINGS, title="Final leaderboard — SS1")
    )
    rows = _finished_rows(_final_leaderboard(out.getvalue()))
    assert [row.split()[:2] for row in rows] == [["1", "11"], ["2", "1"]]
    assert "8:28.1" in rows[1]
    assert "+1:36.0" in rows[1]
    assert "2:00.0" in rows[1]


def test_metrics_are_summed_over_labels() -> None:
    text = (
        "# TYPE processor_records_written_total counter\n"
        "processor_records_written_total 1200.0\n"
        "# TYPE processor_dead_letters_total counter\n"
        'processor_dead_letters_total{reason="bad_json"} 2.0\n'
        'processor_dead_letters_total{reason="bad_imei"} 3.0\n'
        "# TYPE processor_stream_lag_entries gauge\n"
        "processor_stream_lag_entries 7.0\n"
    )
    figures = parse_metrics(text)
    assert (figures.stored, figures.dead_letters, figures.stream_lag) == (1200, 5, 7)
    assert figures.duplicates == 0


def test_plain_snapshot_shows_leaders_pipeline_alerts_and_warnings() -> None:
    alert = Alert(datetime(2026, 6, 1, 8, 0, tzinfo=UTC), False, "sos", "critical", 7)
    snapshot = Snapshot(
        STANDINGS, (alert,), 3, Pipeline(stored=10), "SS1", warnings=("processor: 2 errors",)
    )
    text = plain_snapshot(snapshot)
    assert "finished 2 · running 1 · not_started 1" in text
    assert "1. #11 Sami Horvat (T1) 6:52.1" in text
    assert "stored 10" in text
    assert "newest sos #7 (critical)" in text
    assert "warning: processor: 2 errors" in text


def _python(tmp_path: Path, name: str, code: str, may_exit: bool = False) -> Child:
    child = Child(name, [sys.executable, "-c", code], tmp_path / f"{name}.log", may_exit)
    child.start(dict(os.environ))
    return child


def test_children_stop_on_sigterm_or_are_killed_after_the_timeout(tmp_path: Path) -> None:
    polite = _python(tmp_path, "polite", "import time; time.sleep(60)")
    stubborn = _python(
        tmp_path,
        "stubborn",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        " print('ready', flush=True); time.sleep(60)",
    )
    while "ready" not in (tmp_path / "stubborn.log").read_text():
        time.sleep(0.05)
    killed = stop_all([polite, stubborn], timeout_s=1.0)
    assert killed == ["stubborn"]
    assert polite.returncode == -15
    assert stubborn.returncode == -9


def test_a_child_that_fails_is_reported_with_its_log(tmp_path: Path) -> None:
    done = _python(tmp_path, "done", "pass", may_exit=True)
    failed = _python(tmp_path, "failed", "import sys; print('[error    ] boom'); sys.exit(3)")
    for child in (done, failed):
        assert child.process is not None
        child.process.wait(10)
    done.check()  # exiting 0 is this one's job
    with pytest.raises(ChildError, match="failed exited with status 3") as caught:
        failed.check()
    assert "boom" in str(caught.value)
    assert failed.count_errors() == 1
    assert failed.count_errors() == 1  # counted once, not at every refresh
    stop_all([done, failed], timeout_s=1.0)
