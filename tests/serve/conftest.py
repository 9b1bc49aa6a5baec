"""A live `mlc serve` on loopback (a subprocess on a free port) and small HTTP helpers for the API tests."""

from __future__ import annotations

import json
import os

# As `mlc serve` does: OpenMP workers that spin while idle make the reference model (transformers, in
# this process) crawl when the cores are shared with a live server. Effective if torch is not loaded yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

API_KEY = "test-key"


@dataclass
class LiveServer:
    proc: subprocess.Popen
    port: int
    runs_dir: Path
    log: Path
    health_seen: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw: Any) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, **kw)

    def metrics(self, **labels: str) -> dict[str, float]:
        """{sample name: value} from /metrics, parsed by prometheus_client's own parser: the samples whose labels
        include `labels`, summed over the other labels (request_success_total over finished_reason)."""
        from prometheus_client.parser import text_string_to_metric_families

        _, text = http(self, "GET", "/metrics")
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if all(s.labels.get(k) == v for k, v in labels.items()):
                    out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def http(server: LiveServer, method: str, path: str, body: Any = None, key: str | None = API_KEY, timeout: float = 60) -> tuple[int, Any]:
    """(status, parsed JSON or text) of one request."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(server.url + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, workdir: Path, *args: str, timeout: float = 240) -> LiveServer:
    """Start `mlc serve` and wait until /health answers 200, recording every status it answered before."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "server.log"
    env = {**os.environ, "MLC_RUNS_DIR": str(workdir / "runs")}
    cmd = [sys.executable, "-m", "mlc", "serve", str(model_dir), "--port", str(port), "--api-key", API_KEY, *args]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    server = LiveServer(proc, port, workdir / "runs", log)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"mlc serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            status, _ = http(server, "GET", "/health", timeout=5)
            server.health_seen.append(status)
            if status == 200:
                return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.02)
    server.stop()
    raise RuntimeError(f"mlc serve did not become healthy in {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    """SmolLM2 in fp32 with a small step budget (prefills get chunked) and an API key."""
    s = start_server(
        smollm2_dir, tmp_path_factory.mktemp("serve"), "--dtype", "float32", "--kv-cache-memory", "256MiB",
        "--max-model-len", "1024", "--max-batched-tokens", "64",
    )
    yield s
    s.stop()


# A served model name that needs escaping in Prometheus' text format (quote, backslash, newline).
TINY_NAME = 'tiny "quoted" \\ model\nline two'


@pytest.fixture(scope="session")
def tiny_chat_model(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama over SmolLM2's tokenizer and chat template (text, chat and tools work; generation is fast)."""
    import shutil

    from tests.conftest import save_tiny_hf_model

    out = tmp_path_factory.mktemp("tiny-chat")
    save_tiny_hf_model("llama", out, vocab_size=49152, max_position_embeddings=512)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(smollm2_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_server(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    s = start_server(tiny_chat_model, tmp_path_factory.mktemp("serve-tiny"), "--served-model-name", TINY_NAME, "--dtype", "float32",
                     "--kv-cache-memory", "32MiB", "--max-model-len", "128", "--max-queue", "16")
    yield s
    s.stop()
