"""SIGTERM with streams in flight: a real `mlc serve` process, real SSE streams over sockets, a real signal."""

from __future__ import annotations

import json
import signal
import threading
import time
from http.client import HTTPConnection

import pytest

from tests.serve.conftest import API_KEY, http, start_server

GRACE = 10.0  # long enough for the 8-token stream to finish on a loaded machine, far short of the 300-token ones


class Stream(threading.Thread):
    """One streamed completion read line by line: its data payloads, the time of each, and any error."""

    def __init__(self, port: int, body: dict):
        super().__init__(daemon=True)
        self.port, self.body = port, body
        self.events: list[tuple[float, str]] = []
        self.error: BaseException | None = None
        self.first = threading.Event()

    def run(self) -> None:
        try:
            conn = HTTPConnection("127.0.0.1", self.port, timeout=120)
            conn.request("POST", "/v1/completions", json.dumps(self.body), {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
            r = conn.getresponse()
            assert r.status == 200, r.read()
            while line := r.readline():
                if line.startswith(b"data: "):
                    self.events.append((time.monotonic(), line[6:].decode().strip()))
                    self.first.set()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
            self.first.set()

    def chunks(self) -> list[dict]:
        return [json.loads(data) for _, data in self.events if data != "[DONE]"]


@pytest.mark.slow
@pytest.mark.realmodel
def test_sigterm_drains_in_flight_streams_aborts_the_rest_at_the_grace_period_and_exits_0(smollm2_dir, tmp_path):
    server = start_server(smollm2_dir, tmp_path, "--dtype", "bfloat16", "--kv-cache-memory", "64MiB", "--max-model-len", "512",
                          "--grace-period", str(GRACE))
    try:
        name = http(server, "GET", "/v1/models")[1]["data"][0]["id"]
        base = {"model": name, "prompt": "Tell me a long story:", "stream": True, "ignore_eos": True, "temperature": 0}
        long = [Stream(server.port, {**base, "max_tokens": 300, "stream_options": {"include_usage": True}}) for _ in range(4)]
        short = Stream(server.port, {**base, "max_tokens": 8})
        for s in [*long, short]:
            s.start()
        for s in [*long, short]:
            assert s.first.wait(60) and s.error is None, s.error
        term = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # Draining: still listening, new work and health checks get 503 with Retry-After.
        conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"model": name, "prompt": "hi", "max_tokens": 2}),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
        r = conn.getresponse()
        body = json.loads(r.read())
        assert r.status == 503 and body["error"]["code"] == "draining" and int(r.getheader("Retry-After")) >= 1
        assert http(server, "GET", "/health", key=None)[0] == 503
        for s in [*long, short]:
            s.join(GRACE + 60)
            assert not s.is_alive() and s.error is None, s.error
        # The short stream finished normally within the grace period.
        assert short.events[-1][1] == "[DONE]" and short.chunks()[-1]["choices"][0]["finish_reason"] == "length"
        for s in long:
            chunks = s.chunks()
            assert s.events[-1][1] == "[DONE]"
            finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is not None]
            assert [c["choices"][0]["finish_reason"] for c in finals] == ["abort"]
            assert chunks[-1]["choices"] == [] and 0 < chunks[-1]["usage"]["completion_tokens"] < 300
            abort_at = next(t for t, data in s.events if '"abort"' in data)
            assert GRACE - 0.5 <= abort_at - term <= GRACE + 10  # cut at the grace period, not before
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
    log = server.log.read_text()
    assert "Traceback" not in log and "Error" not in log, log
    run = json.loads(next(server.runs_dir.glob("*serve*/run.json")).read_text())
    assert run["status"] == "completed" and run["summary"]["requests"] >= 5
