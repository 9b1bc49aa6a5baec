"""A scripted token server in its own process (tests/bench/scripted_server.py) and helpers to read its log."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO


@dataclass
class ScriptedProcess:
    url: str
    log: Path
    proc: subprocess.Popen

    def entries(self) -> list[dict]:
        """Every request the server answered, in the order they finished."""
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def last_for(self, prompt: str) -> dict:
        return [e for e in self.entries() if e["prompt"] == prompt][-1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_scripted(log: Path) -> ScriptedProcess:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.bench.scripted_server", str(port), "--log", str(log)], cwd=REPO, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return ScriptedProcess(url, log, proc)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the scripted server did not start")


@pytest.fixture
def scripted(tmp_path: Path):
    """A fresh scripted server process per test (its log holds only that test's requests)."""
    server = start_scripted(tmp_path / "server-log.jsonl")
    yield server
    server.proc.terminate()
    server.proc.wait(10)


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path
