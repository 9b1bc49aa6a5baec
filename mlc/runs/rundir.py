"""Run directories: the record of what each command did, with what, and what it made.

runs/<YYYYmmdd-HHMMSS>-<command>-<id>/
    run.json        status, argv, config, versions, git commit, pid, host, inputs, artifacts (atomic writes)
    run.lock        held (flock) by the one process writing the run; a dead holder means "interrupted"
    config.given.*  the config as given; the resolved one lives in run.json
    artifacts/<name>/manifest.json   an artifact is complete only once its manifest exists
    metrics.jsonl   append-only
    log.txt
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from mlc import __version__
from mlc.errors import InputError, MlcError
from mlc.io.atomic import atomic_write_json, replace_dir, staging_dir_for
from mlc.runs import hashing, index
from mlc.runs.record import read_run
from mlc.runs.refs import resolve

STATUSES = ("running", "completed", "failed", "interrupted")
PROVENANCE_FILE = "mlc-provenance.json"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
    """Versions of mlc, python, torch and CUDA, without importing torch if nothing has yet."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version: str | None = version("torch")
    except PackageNotFoundError:
        torch_version = None
    torch = sys.modules.get("torch")
    cuda = getattr(getattr(torch, "version", None), "cuda", None) if torch else None
    return {"mlc": __version__, "python": platform.python_version(), "torch": torch_version, "cuda": cuda}


def git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=cwd, capture_output=True, text=True, check=False)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def new_run_id(command: str) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{command}-{secrets.token_hex(3)}"


class Run:
    """A run being written by this process. Create with open_run(); only its owner writes it."""

    def __init__(self, path: Path, data: dict[str, Any], lock_fd: int):
        self.path = path
        self.data = data
        self._lock_fd = lock_fd
        self.root = path.parent

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def command(self) -> str:
        return self.data["command"]

    # ---- life cycle -------------------------------------------------------------------------
    @classmethod
    def create(cls, runs_root: Path, command: str, argv: list[str], config: dict[str, Any] | None = None) -> "Run":
        runs_root = Path(runs_root).absolute()
        runs_root.mkdir(parents=True, exist_ok=True)
        while True:
            run_id = new_run_id(command)
            path = runs_root / run_id
            try:
                path.mkdir()  # exclusive: two processes never get the same directory
                break
            except FileExistsError:
                continue
        lock_fd = _take_lock(path)
        data = {
            "id": run_id,
            "command": command,
            "argv": argv,
            "cwd": os.getcwd(),
            "config": config or {},
            "status": "running",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": now_iso(),
            "ended": None,
            "exit_code": None,
            "error": None,
            "versions": versions(),
            "git_commit": git_commit(Path.cwd()),
            "inputs": [],
            "artifacts": {},
            "summary": {},
        }
        run = cls(path, data, lock_fd)
        (path / "artifacts").mkdir()
        run.save()
        return run

    @classmethod
    def reopen(cls, path: str | os.PathLike) -> "Run":
        """Take over an existing run (e.g. to resume training); refused while another process writes it."""
        record = read_run(path)
        lock_fd = _take_lock(record.path)
        data = record.data
        data.update(status="running", pid=os.getpid(), host=socket.gethostname(), ended=None, exit_code=None, error=None)
        data.setdefault("resumes", []).append(now_iso())
        run = cls(record.path, data, lock_fd)
        run.save()
        return run

    def save(self) -> None:
        atomic_write_json(self.path / "run.json", self.data)
        index.update_run(self.root, self.path, self.data)

    def finish(self, status: str, exit_code: int, error: str | None = None) -> None:
        self.data.update(status=status, exit_code=exit_code, error=error, ended=now_iso())
        self.save()
        os.close(self._lock_fd)
        self._lock_fd = -1

    # ---- contents ---------------------------------------------------------------------------
    def set_config(self, config: dict[str, Any], given_text: str | None = None, given_suffix: str = ".txt") -> None:
        """Record the resolved config (and the file as given)."""
        self.data["config"] = config
        if given_text is not None:
            (self.path / f"config.given{given_suffix}").write_text(given_text)
        self.save()

    def set_summary(self, **values: Any) -> None:
        self.data["summary"].update(values)
        self.save()

    def log(self, message: str) -> None:
        with open(self.path / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{now_iso()} {message}\n")

    def log_metrics(self, values: dict[str, Any]) -> None:
        values = {"time": round(time.time(), 3), **values}
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(values, default=float) + "\n")

    def add_input(self, ref: str | os.PathLike, role: str = "input") -> Path:
        """Resolve a path or artifact reference, hash it, record it with its producer; return the path."""
        resolved = resolve(str(ref), self.root)
        entry = {
            "role": role,
            "ref": str(ref),
            "path": str(resolved.path),
            "hash": hashing.content_hash(resolved.path),
            "producer_run": resolved.run_id,
            "producer_artifact": resolved.artifact,
        }
        if resolved.hub is not None:  # which weights a Hub id meant at the time: the revision asked and its commit
            entry["hub"] = {"repo": resolved.hub.repo, "revision": resolved.hub.revision, "commit": resolved.hub.commit}
        if entry["producer_run"] is None:
            producer = find_producer(self.root, resolved.path, entry["hash"])
            if producer:
                entry["producer_run"], entry["producer_artifact"] = producer
        self.data["inputs"].append(entry)
        self.save()
        return resolved.path

    @contextlib.contextmanager
    def artifact(
        self, name: str, kind: str = "model", out: str | os.PathLike | None = None, overwrite: bool = False, meta: dict[str, Any] | None = None
    ) -> Iterator[Path]:
        """Yield a staging directory; on success it becomes artifacts/<name>/ (or `out`) with a manifest.

        The artifact counts only once its manifest is written, after the files are in place.
        """
        record_dir = self.path / "artifacts" / name
        final = Path(out).absolute() if out is not None else record_dir
        if final.exists() and not overwrite:
            raise InputError(f"output {final} already exists", "choose another --out or pass --overwrite")
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_dir_for(final)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            yield staging
            self._write_provenance(staging, name, kind, meta or {})
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        replace_dir(staging, final)
        self._write_manifest(name, kind, final, record_dir, meta or {})

    def _write_provenance(self, where: Path, name: str, kind: str, meta: dict[str, Any]) -> None:
        provenance = {
            "run_id": self.id,
            "run_path": str(self.path),
            "command": self.command,
            "artifact": name,
            "kind": kind,
            "inputs": [{k: i[k] for k in ("role", "ref", "hash", "producer_run")} for i in self.data["inputs"]],
            "created": now_iso(),
            "meta": meta,
        }
        (where / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")

    def _write_manifest(self, name: str, kind: str, files_at: Path, record_dir: Path, meta: dict[str, Any]) -> None:
        record_dir.mkdir(parents=True, exist_ok=True)
        files = hashing.tree_manifest(files_at, exclude={"manifest.json"} if files_at == record_dir else None)
        manifest = {
            "name": name,
            "kind": kind,
            "run_id": self.id,
            "path": str(files_at),
            "hash": hashing.manifest_hash(files),
            "files": files,
            "meta": meta,
            "created": now_iso(),
        }
        atomic_write_json(record_dir / "manifest.json", manifest)
        self.data["artifacts"][name] = {"kind": kind, "path": str(files_at), "hash": manifest["hash"]}
        self.save()


def _take_lock(path: Path) -> int:
    fd = os.open(path / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MlcError(f"run {path.name} is being written by another process", "wait for it to finish, or stop it first") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
    return fd


def find_producer(runs_root: Path, path: Path, content_hash: str) -> tuple[str, str] | None:
    """Which run made this file or directory: by the index (content hash), else its provenance file."""
    found = index.find_artifact_by_hash(runs_root, content_hash)
    if found:
        return found
    prov = path / PROVENANCE_FILE if path.is_dir() else None
    if prov is not None and prov.is_file():
        try:
            data = json.loads(prov.read_text())
            return data["run_id"], data["artifact"]
        except (json.JSONDecodeError, KeyError):
            return None
    return None


def exit_status(exc: BaseException | None) -> tuple[str, int, str | None]:
    """Map how a command ended to (status, exit code, error text)."""
    if exc is None:
        return "completed", 0, None
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130, "interrupted (Ctrl-C or SIGTERM)"
    if isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) else 1
        return ("completed" if code == 0 else "failed"), code, None if code == 0 else f"exit {code}"
    text = exc.one_line() if isinstance(exc, MlcError) else f"{exc.__class__.__name__}: {exc}"
    return "failed", getattr(exc, "exit_code", 1), text


@contextlib.contextmanager
def open_run(
    command: str,
    config: dict[str, Any] | None = None,
    runs_root: str | os.PathLike | None = None,
    argv: list[str] | None = None,
    handle_sigterm: bool = True,
) -> Iterator[Run]:
    """Open a new run for `command`; it ends completed, failed or interrupted with the block."""
    from mlc import options

    root = Path(runs_root) if runs_root is not None else options.get().runs_dir
    run = Run.create(root, command, argv if argv is not None else ["mlc", *sys.argv[1:]], config)
    previous = None
    if handle_sigterm and _in_main_thread():
        previous = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        yield run
    except BaseException as e:
        status, code, error = exit_status(e)
        run.log(f"ended {status}: {error}")
        run.finish(status, code, error)
        raise
    else:
        run.finish("completed", 0)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _sigterm_to_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
