"""Run every ``benchmarks/*_bench.py`` in turn with its defaults (``make bench``).

Each runs in a process of its own (``python -m benchmarks.<name>``) so one cannot skew
another's memory figures; the exit status is non-zero if any of them failed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> int:
    """Run each benchmark, print its output under a header, return the failure count."""
    failed = []
    for path in sorted(Path(__file__).parent.glob("*_bench.py")):
        module = f"benchmarks.{path.stem}"
        print(f"\n=== {module} ===", flush=True)
        if subprocess.call([sys.executable, "-m", module]) != 0:
            failed.append(module)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
