"""The README's main-job command, run as a new user would: ``make demo``, unattended.

No fixtures and no shortcuts: the exact command from the repository root, with no
PROCESSOR_* variable set (devservices finds or starts the servers), as a subprocess.
It must exit 0 and print a final leaderboard with finished entries.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DURATION_S = 90  # at the default x20, the whole field of 50 has started by ~80 s
COMMAND = ["make", "demo", f"ARGS=--duration {DURATION_S}"]
TIME = re.compile(r"\b\d+:\d\d\.\d\b")

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
