"""A read-only view of a runs root for people browsing it: every run's record, metrics, log tail and result files.

The run directories are the truth and this module only reads them: it never writes the SQLite index (a cache
that the commands keep), so a viewer can watch a runs root that other processes are writing, even one it may
not write to. Records are re-read only when their run.json changed (size and mtime), so listing a root of a
thousand runs costs a stat per run after the first look.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlc.runs.record import RunRecord, read_run

MAX_JSON_BYTES = 64 * 2**20  # result files bigger than this are not parsed for a page (a bench of 100k requests is ~40 MB)
MAX_METRIC_ROWS = 200_000


@dataclass(frozen=True)
class Damaged:
    """A run directory whose run.json cannot be read: listed so people see it, never opened."""

    id: str
    path: Path
    error: str


class Catalog:
    """The runs under one root, looked up only by the names of their directories (never by a path built from input)."""

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self._records: dict[str, tuple[tuple[int, int], RunRecord | Damaged]] = {}

    def scan(self) -> list[RunRecord | Damaged]:
        """Every run, newest first (damaged ones included, as Damaged)."""
        found: dict[str, tuple[tuple[int, int], RunRecord | Damaged]] = {}
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            entries = []
        for entry in entries:
            try:
                st = os.stat(os.path.join(entry.path, "run.json"))
            except OSError:
                continue  # not a run directory (index.sqlite, a stray file, a directory being created)
            key = (st.st_size, st.st_mtime_ns)
            cached = self._records.get(entry.name)
            if cached and cached[0] == key and not (isinstance(cached[1], RunRecord) and cached[1].data.get("status") == "running"):
                found[entry.name] = cached
                continue
            found[entry.name] = (key, self._read(Path(entry.path)))
        self._records = found
        items = [v for _, v in found.values()]
        return sorted(items, key=lambda r: (_started(r), r.id if isinstance(r, Damaged) else r.id), reverse=True)

    def _read(self, path: Path) -> RunRecord | Damaged:
        try:
            record = read_run(path)
            if not isinstance(record.data, dict) or not isinstance(record.data.get("id"), str) or not isinstance(record.data.get("command"), str):
                return Damaged(path.name, path, "run.json lacks an id or command")
            return record
        except Exception as e:  # noqa: BLE001 - a damaged run.json (any shape) is shown as damaged, never fatal to the listing
            return Damaged(path.name, path, getattr(e, "message", str(e)))

    def get(self, run_id: str) -> RunRecord | Damaged | None:
        """The run whose directory is named run_id exactly, or None."""
        if run_id not in self._records:
            self.scan()
        item = self._records.get(run_id)
        return item[1] if item else None

    def records(self) -> list[RunRecord]:
        return [r for r in self.scan() if isinstance(r, RunRecord)]


def _started(r: RunRecord | Damaged) -> str:
    return "" if isinstance(r, Damaged) else str(r.data.get("started") or "")


def inside(run_path: Path, relative: str) -> Path | None:
    """run_path/relative if it stays inside the run directory after following links, else None."""
    base = run_path.resolve()
    target = (base / relative).resolve()
    return target if target.is_relative_to(base) else None


def read_json_file(path: Path | None) -> Any | None:
    """A JSON file's content, or None when it is missing, too big, or not JSON."""
    if path is None:
        return None
    try:
        if not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None


def run_json_file(record: RunRecord, relative: str) -> Any | None:
    """A JSON file inside the run directory (e.g. report.json, artifacts/search/pareto.json)."""
    return read_json_file(inside(record.path, relative))


def metrics(record: RunRecord) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl that parse as JSON objects (a line being appended, or a damaged one, is skipped)."""
    path = inside(record.path, "metrics.jsonl")
    if path is None or not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    continue
                if isinstance(row, dict):
                    rows.append(row)
                    if len(rows) >= MAX_METRIC_ROWS:
                        break
    except OSError:
        return []
    return rows


def log_tail(record: RunRecord, lines: int = 200, max_bytes: int = 256 * 1024) -> list[str]:
    """The last lines of log.txt (read from its end, so a long log costs no more than a short one)."""
    path = inside(record.path, "log.txt")
    if path is None:
        return []
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    out = text.splitlines()
    if size > max_bytes and out:
        out = out[1:]  # the first line was cut in the middle
    return out[-lines:]
