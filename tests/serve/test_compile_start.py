"""`mlc serve --compile` serves eagerly at once, swaps the compiled decode step in, keeps it on disk, survives a failed compile."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.serve.conftest import LiveServer, http, start_server

pytestmark = pytest.mark.slow  # each test starts servers and compiles (tens of seconds on a busy 2-core machine)

# One sequence at a time: the one kind of decode step ("single") is all there is to compile, which keeps the tests short.
ARGS = ("--compile", "--dtype", "float32", "--kv-cache-memory", "32MiB", "--max-model-len", "128", "--max-running", "1")
PROMPT = {"model": "m", "prompt": "The quick brown fox jumps over", "max_tokens": 12, "temperature": 0}


def compiled_kinds(server: LiveServer) -> tuple[float, float, float]:
    m = server.metrics()
    return m["mlc:compiled_decode_kinds"], m["mlc:decode_kinds_to_compile"], m["mlc:compile_failed"]


def complete(server: LiveServer) -> str:
    status, body = http(server, "POST", "/v1/completions", {**PROMPT, "model": served(server)})
    assert status == 200, body
    return body["choices"][0]["text"]


def served(server: LiveServer) -> str:
    return http(server, "GET", "/v1/models")[1]["data"][0]["id"]


def wait_for_log(server: LiveServer, pattern: str, timeout: float = 300) -> re.Match:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if m := re.search(pattern, server.log.read_text()):
            return m
        assert server.proc.poll() is None, server.log.read_text()
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in the log:\n{server.log.read_text()}")


def test_compile_serves_eagerly_at_once_swaps_in_with_the_same_tokens_and_reuses_its_cache(
        tiny_chat_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLC_CACHE", str(tmp_path / "cache"))  # a cold compile cache
    server = start_server(tiny_chat_model, tmp_path / "cold", *ARGS)
    try:
        assert compiled_kinds(server) == (0, 1, 0)  # healthy before anything was compiled: served eagerly
        outputs: list[tuple[float, str]] = []
        end = time.monotonic() + 300
        while time.monotonic() < end:
            before = compiled_kinds(server)[0]
            outputs.append((before, complete(server)))
            if sum(k == 1 for k, _ in outputs) >= 2:
                break
            time.sleep(0.2)  # leave the cores to the compiler between requests
        eager = [text for k, text in outputs if k == 0]
        compiled = [text for k, text in outputs if k == 1]
        assert eager and len(compiled) >= 2, outputs
        assert set(eager) == set(compiled) == {eager[0]}, outputs  # greedy tokens before, across and after the swap
        assert re.search(r"compiled decode step 'single' in use after [0-9.]+s", server.log.read_text())
        built = wait_for_log(server, r"(\d+) graphs loaded from the cache, (\d+) built")
        assert int(built.group(2)) >= 1
    finally:
        assert server.stop() == 0
    keyed = list((tmp_path / "cache" / "compile").iterdir())
    assert len(keyed) == 1 and any(p.is_file() for p in (keyed[0] / "fxgraph").rglob("*"))

    server = start_server(tiny_chat_model, tmp_path / "warm", *ARGS)  # the same model again: its code comes from the cache
    try:
        warm = wait_for_log(server, r"(\d+) graphs loaded from the cache, (\d+) built")
        assert int(warm.group(1)) >= 1 and int(warm.group(2)) == 0  # fewer than built: the dynamic graph directly (see compiling.py)
        assert compiled_kinds(server) == (1, 1, 0)
        assert complete(server) == eager[0]
    finally:
        assert server.stop() == 0


def test_a_failed_compile_leaves_the_server_serving_eagerly(tiny_chat_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "/bin/false")  # inductor cannot build its kernels
    server = start_server(tiny_chat_model, tmp_path / "serve", *ARGS)
    try:
        wait_for_log(server, r"torch.compile of the decode step failed, serving eagerly: \S")
        assert compiled_kinds(server) == (0, 1, 1)
        assert http(server, "GET", "/health")[0] == 200
        assert complete(server)
    finally:
        assert server.stop() == 0
    assert server.log.read_text().count("failed, serving eagerly") == 1
