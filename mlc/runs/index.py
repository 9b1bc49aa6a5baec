"""The SQLite index at the runs root: a cache of the run directories, rebuildable at any time.

The directories are the truth. Every write to a run updates its row (best effort: a failure here
never fails a run), and `mlc runs reindex` rebuilds the whole index from the directories.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from mlc.runs.record import read_run

INDEX_FILE = "index.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, command TEXT, status TEXT, started TEXT, ended TEXT,
    path TEXT, pid INTEGER, host TEXT, data TEXT
);
CREATE TABLE IF NOT EXISTS artifacts (
    run_id TEXT, name TEXT, kind TEXT, path TEXT, hash TEXT, PRIMARY KEY (run_id, name)
);
CREATE INDEX IF NOT EXISTS artifacts_hash ON artifacts (hash);
CREATE INDEX IF NOT EXISTS artifacts_path ON artifacts (path);
CREATE TABLE IF NOT EXISTS inputs (
    run_id TEXT, role TEXT, ref TEXT, path TEXT, hash TEXT, producer_run TEXT, producer_artifact TEXT
);
CREATE INDEX IF NOT EXISTS inputs_run ON inputs (run_id);
"""


def connect(runs_root: Path) -> sqlite3.Connection:
    runs_root.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(runs_root / INDEX_FILE, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    return conn


def _write_run(conn: sqlite3.Connection, path: Path, data: dict[str, Any]) -> None:
    run_id = data["id"]
    conn.execute(
        "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (run_id, data["command"], data["status"], data["started"], data.get("ended"), str(path),
         data.get("pid"), data.get("host"), json.dumps(data, default=str)),
    )
    conn.execute("DELETE FROM artifacts WHERE run_id = ?", (run_id,))
    conn.executemany(
        "INSERT INTO artifacts VALUES (?, ?, ?, ?, ?)",
        [(run_id, name, a["kind"], a["path"], a["hash"]) for name, a in data.get("artifacts", {}).items()],
    )
    conn.execute("DELETE FROM inputs WHERE run_id = ?", (run_id,))
    conn.executemany(
        "INSERT INTO inputs VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(run_id, i["role"], i["ref"], i["path"], i["hash"], i.get("producer_run"), i.get("producer_artifact"))
         for i in data.get("inputs", [])],
    )


def update_run(runs_root: Path, path: Path, data: dict[str, Any]) -> None:
    try:
        conn = connect(runs_root)
        with conn:
            _write_run(conn, path, data)
        conn.close()
    except sqlite3.Error:
        pass  # the index is a cache; `mlc runs reindex` repairs it


def run_dirs(runs_root: Path) -> list[Path]:
    if not runs_root.is_dir():
        return []
    return sorted(p for p in runs_root.iterdir() if p.is_dir() and (p / "run.json").is_file())


def reindex(runs_root: Path) -> int:
    """Rebuild the index from the run directories; return the number of runs indexed."""
    conn = connect(runs_root)
    count = 0
    with conn:
        conn.execute("DELETE FROM runs")
        conn.execute("DELETE FROM artifacts")
        conn.execute("DELETE FROM inputs")
        for path in run_dirs(runs_root):
            try:
                record = read_run(path)
            except Exception:  # noqa: BLE001 - a run.json damaged in any way is shown by `runs ls` as missing; gc can remove it
                continue
            _write_run(conn, path, record.data)
            count += 1
    conn.close()
    return count


def sync(runs_root: Path) -> None:
    """Bring the index in line with the directories when runs were added or removed behind its back."""
    dirs = {p.name for p in run_dirs(runs_root)}
    conn = connect(runs_root)
    indexed = {row[0] for row in conn.execute("SELECT id FROM runs")}
    conn.close()
    if dirs != indexed:
        reindex(runs_root)


def _paths_from_directories(runs_root: Path, command: str | None) -> list[Path]:
    found = []
    for path in run_dirs(runs_root):
        try:
            data = read_run(path).data
        except Exception:  # noqa: BLE001 - a damaged run.json is left out, as in the index
            continue
        if command is None or data.get("command") == command:
            found.append((data.get("started", ""), data.get("id", ""), path))
    return [p for _, _, p in sorted(found, reverse=True)]


def find_artifact_by_hash(runs_root: Path, content_hash: str) -> tuple[str, str] | None:
    if not (runs_root / INDEX_FILE).exists():
        return None
    try:
        conn = connect(runs_root)
        row = conn.execute(
            "SELECT a.run_id, a.name FROM artifacts a JOIN runs r ON r.id = a.run_id WHERE a.hash = ? ORDER BY r.started LIMIT 1",
            (content_hash,),
        ).fetchone()
        conn.close()
    except sqlite3.Error:
        return None
    return (row[0], row[1]) if row else None


def query_runs(runs_root: Path, command: str | None = None, status: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Runs newest first, as their run.json dicts (status corrected for dead processes).

    When the index cannot be read or brought up to date (a full disk: SQLite needs to write to read a WAL database),
    the run directories themselves are read: slower, but they are the truth.
    """
    try:
        sync(runs_root)
        conn = connect(runs_root)
        sql, args = "SELECT path FROM runs", []
        if command:
            sql += " WHERE command = ?"
            args.append(command)
        sql += " ORDER BY started DESC, id DESC"
        paths = [Path(r[0]) for r in conn.execute(sql, args)]
        conn.close()
    except sqlite3.Error:
        paths = _paths_from_directories(runs_root, command)
    out = []
    for p in paths:
        try:
            data = {**read_run(p).data, "path": str(p)}
        except Exception:  # noqa: BLE001 - a run.json damaged in any way is left out of the listing
            continue
        if status and data["status"] != status:
            continue
        out.append(data)
        if limit and len(out) >= limit:
            break
    return out
