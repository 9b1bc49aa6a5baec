"""Content hashes of files and directories, streamed, and cached by (path, size, mtime, inode).

A 100 GB checkpoint is hashed once; later uses find its hash in a small SQLite cache under
MLC_CACHE as long as the file's size and modification time are unchanged.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path

from mlc.paths import cache_dir

CHUNK = 8 * 2**20
_local = threading.local()
SKIP_NAMES = {".DS_Store"}


def _cache() -> sqlite3.Connection | None:
    conn = getattr(_local, "conn", None)
    if conn is None:
        try:
            conn = sqlite3.connect(cache_dir() / "hashes.sqlite", timeout=30)
            conn.execute(
                "CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER, sha256 TEXT)"
            )
        except sqlite3.Error:
            return None  # an unwritable cache only costs speed
        _local.conn = conn
    return conn


def file_sha256(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file, from the cache when the file is unchanged."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns, st.st_ino)
    conn = _cache()
    if conn is not None:
        try:
            row = conn.execute("SELECT size, mtime_ns, inode, sha256 FROM hashes WHERE path = ?", (key[0],)).fetchone()
        except sqlite3.Error:
            row = None
        if row is not None and tuple(row[:3]) == key[1:]:
            return row[3]
    h = hashlib.sha256()
    with open(p, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    digest = h.hexdigest()
    if conn is not None:
        try:
            with conn:
                conn.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)", (*key, digest))
        except sqlite3.Error:
            pass
    return digest


def list_files(root: Path) -> list[Path]:
    """Files under root (relative), skipping hidden temp outputs, sorted for a stable hash."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if ".mlc-tmp-" not in d)
        for name in filenames:
            if name in SKIP_NAMES or ".mlc-tmp-" in name:
                continue
            files.append(Path(dirpath, name).relative_to(root))
    return sorted(files)


def tree_manifest(root: str | os.PathLike, exclude: set[str] | None = None) -> dict[str, dict[str, object]]:
    """Map each file under root (relative path) to its size and sha256."""
    root = Path(root)
    return {
        str(rel): {"size": (root / rel).stat().st_size, "sha256": file_sha256(root / rel)}
        for rel in list_files(root)
        if not exclude or str(rel) not in exclude
    }


def manifest_hash(files: dict[str, dict[str, object]]) -> str:
    """One hash for a set of files: sha256 over the sorted 'path sha256' lines."""
    lines = "".join(f"{rel}\t{meta['sha256']}\n" for rel, meta in sorted(files.items()))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def content_hash(path: str | os.PathLike, exclude: set[str] | None = None) -> str:
    """The content hash of a file (sha256:<hex>) or of a directory's files (their manifest hash)."""
    p = Path(path)
    if p.is_dir():
        return manifest_hash(tree_manifest(p, exclude))
    return "sha256:" + file_sha256(p)
