"""What the scale benchmarks share: one measurement in a fresh child process, and their column table."""

from __future__ import annotations

import json
import subprocess
import sys


def measure_in_child(cmd: list[str]) -> dict:
    """Run `cmd` (the benchmark itself in child mode); its last stdout line is the JSON measurement.

    A failed child prints the tail of its stderr and ends the benchmark with the child's exit code.
    """
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        raise SystemExit(res.returncode)
    return json.loads(res.stdout.strip().splitlines()[-1])


def print_rows(rows: list[dict], cols: list[str]) -> None:
    """One right-aligned line per row, integers with thousands separators."""
    print(" | ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>12,}" if isinstance(r[c], int) else f"{r[c]:>12}" for c in cols))
