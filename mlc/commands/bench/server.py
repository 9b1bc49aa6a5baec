"""The server under test: its URL, a server command that bench starts and stops itself, cold start.

`--server "CMD"` runs CMD (a `{port}` in it becomes a free port, and the base URL follows), waits until
GET /health answers 200 (or, for servers without /health, GET /v1/models does), and after the
benchmark stops it with SIGTERM (SIGKILL after a minute). A command starting with `mlc` runs as
`python -m mlc` of this installation, with this run's --runs-dir, so its own run lands next to the bench run.
Cold start = process start -> healthy -> the first streamed token of the first request.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlc.errors import MlcError, MlcUsageError

SERVE_FLAGS = {"--compile", "--no-compile", "--prefix-caching", "--no-prefix-caching", "--help", "-h"}  # mlc serve's options without a value


def normalize_base_url(url: str) -> str:
    """scheme://host[:port][/prefix] without a trailing /v1 (the endpoint paths add it)."""
    parsed = urllib.parse.urlparse(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise MlcUsageError(f"--base-url {url!r} is not an http(s) URL", "for example --base-url http://127.0.0.1:8000")
    try:
        parsed.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise MlcUsageError(f"--base-url {url!r} has a bad port", "for example --base-url http://127.0.0.1:8000") from None
    path = parsed.path.rstrip("/")
    path = path[: -len("/v1")] if path.endswith("/v1") else path
    return f"{parsed.scheme}://{parsed.netloc}{path}"


def http_get(url: str, headers: dict[str, str], timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def unreachable(base_url: str, error: BaseException) -> MlcError:
    reason = getattr(error, "reason", error)
    return MlcError(f"cannot reach {base_url}: {reason}", "is the server running? check --base-url (or start it with --server)")


def first_model(base_url: str, headers: dict[str, str]) -> str:
    """The id of the first model the server lists at /v1/models."""
    try:
        status, raw = http_get(base_url + "/v1/models", headers, timeout=30)
    except (OSError, urllib.error.URLError) as e:
        raise unreachable(base_url, e) from None
    try:
        models = json.loads(raw).get("data") if status == 200 else None
        return str(models[0]["id"])
    except (json.JSONDecodeError, AttributeError, IndexError, KeyError, TypeError):
        raise MlcError(f"{base_url}/v1/models gave no model (HTTP {status})", "name the model with --model") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_mlc_model(argv: list[str]) -> str | None:
    """MODEL of an `mlc [global options] serve MODEL ...` command line, else None."""
    if not argv or Path(argv[0]).name != "mlc" or "serve" not in argv:
        return None
    rest = argv[argv.index("serve") + 1 :]
    i = 0
    while i < len(rest):
        word = rest[i]
        if not word.startswith("-"):
            return word
        i += 1 if ("=" in word or word in SERVE_FLAGS) else 2
    return None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when bench dies, even by SIGKILL, so no server outlives its benchmark (Linux).

    The signal follows the thread that started the child: bench starts servers from its main thread.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class ManagedServer:
    """A server process that bench started; stop() ends it."""

    argv: list[str]
    base_url: str
    proc: subprocess.Popen
    log: Path
    started_at: float  # perf_counter at process start
    healthy_at: float | None = None

    @classmethod
    def start(cls, command: str, base_url: str | None, runs_root: Path, log: Path) -> "ManagedServer":
        port = free_port()
        try:
            argv = [w.replace("{port}", str(port)) for w in shlex.split(command)]
        except ValueError as e:
            raise MlcUsageError(f"--server {command!r} is not a valid command line ({e})", "quote it as one shell word") from None
        if not argv:
            raise MlcUsageError("--server is empty", "give the command that starts the server")
        if "{port}" in command:
            base_url = f"http://127.0.0.1:{port}"
        elif base_url is None:
            raise MlcUsageError("--server needs {port} in the command or a --base-url to reach it", 'e.g. --server "mlc serve MODEL --port {port}"')
        run_argv = [sys.executable, "-m", "mlc", *argv[1:]] if Path(argv[0]).name == "mlc" else argv
        env = {**os.environ, "MLC_RUNS_DIR": str(runs_root), "PYTHONUNBUFFERED": "1"}
        started = time.perf_counter()
        try:
            with open(log, "wb") as f:
                proc = subprocess.Popen(run_argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        except OSError as e:
            raise MlcUsageError(f"cannot start --server command {argv[0]!r}: {e.strerror}", "check the command") from None
        return cls(argv, normalize_base_url(base_url), proc, log, started)

    def wait_healthy(self, headers: dict[str, str], timeout: float) -> float:
        """Seconds from process start to a healthy answer; raises if the process dies or time runs out."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise MlcError(f"the server exited with code {self.proc.returncode} before it was ready: {self.last_line()}", f"its output is in {self.log}")
            if self._healthy(headers):
                self.healthy_at = time.perf_counter()
                return self.healthy_at - self.started_at
            time.sleep(0.1)
        raise MlcError(f"the server was not healthy after {timeout:.0f}s", f"its output is in {self.log}; raise --server-timeout")

    def _healthy(self, headers: dict[str, str]) -> bool:
        try:
            status, _ = http_get(self.base_url + "/health", headers, timeout=2)
            if status == 404:
                status, _ = http_get(self.base_url + "/v1/models", headers, timeout=2)
            return status == 200
        except (OSError, urllib.error.URLError):
            return False

    def last_line(self) -> str:
        try:
            lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
        except OSError:
            return ""
        return lines[-1].strip()[:300] if lines else "(no output)"

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: children (workers) go too
                self.proc.wait()
        return self.proc.returncode

    def cpu_seconds(self) -> float | None:
        """CPU time the server process has used so far (all its threads; Linux /proc), or None where unknown."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, IndexError, ValueError):
            return None

    def describe(self) -> dict[str, Any]:
        return {"command": shlex.join(self.argv), "pid": self.proc.pid, "log": str(self.log)}
