"""Median wall time of `mlc --help` and `mlc merge --help`, next to the interpreter's own floors.

    .venv/bin/python benchmarks/cli_startup.py [--runs 15]

Floors timed in the same run: `python -c pass` and `python -c 'import typer'`. Target: mlc under 0.15 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def median_wall(cmd: list[str], runs: int) -> float:
    subprocess.run(cmd, capture_output=True)  # warm the page cache
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=False)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    py = sys.executable
    cases = {
        "python -c pass": [py, "-c", "pass"],
        "python -c 'import typer'": [py, "-c", "import typer"],
        "mlc --help": [py, "-m", "mlc", "--help"],
        "mlc merge --help": [py, "-m", "mlc", "merge", "--help"],
        "mlc runs ls": [py, "-m", "mlc", "--runs-dir", "/tmp/mlc-bench-empty-runs", "runs", "ls"],
    }
    print(f"{'command':<28} {'median s':>9}")
    for label, cmd in cases.items():
        print(f"{label:<28} {median_wall(cmd, args.runs):>9.3f}")


if __name__ == "__main__":
    main()
