"""`mlc serve --compile` serves eagerly at once, swaps the compiled decode step in, keeps it on disk, survives a failed compile."""

from __future__ import annotations

import functools
import re
import time
from pathlib import Path

import pytest
import torch

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
        assert (int(warm.group(1)), int(warm.group(2))) == (int(built.group(2)), 0)  # every graph the cold start built, loaded
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


def test_each_kind_compiles_to_one_graph_and_a_second_start_asks_for_the_same_graphs(
        tiny_hf_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A warm start builds nothing only if it asks for exactly the graphs the cold one built and cached.

    Two starts in one process (dynamo's state dropped between them, as a new process has it) with a backend that
    records each graph dynamo hands it, with its symbolic input shapes (what inductor's cache key is made from).
    Before the step inputs were marked dynamic up front, a kind was compiled static and then dynamic, and the second
    start compiled the batch-1 kind under the dimensions that the later kinds had made dynamic in the first one.
    """
    from mlc.commands.serve import compiling
    from mlc.commands.serve.engine import Engine, EngineConfig
    from mlc.models import load_model
    from tests.serve.test_engine_models import NumberTokenizer

    monkeypatch.setenv("MLC_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # put back after the test, as are these:
    monkeypatch.setattr(torch.compiler.config, "dynamic_sources", torch.compiler.config.dynamic_sources)
    monkeypatch.setattr(torch._dynamo.config, "automatic_dynamic_local_pgo", torch._dynamo.config.automatic_dynamic_local_pgo)
    graphs: list[tuple[str, str]] = []  # (the kind being compiled, the graph)
    kind_now: list[str] = []
    original = compiling.DecodeCompiler._compile_kind

    def compile_kind(self, scratch, kind, rounds):
        kind_now[:] = [kind]
        original(self, scratch, kind, rounds)

    def record(gm: torch.fx.GraphModule, example_inputs):
        graphs.append((kind_now[0], gm.print_readable(print_output=False)))
        return gm.forward

    monkeypatch.setattr(compiling.DecodeCompiler, "_compile_kind", compile_kind)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=record))
    monkeypatch.setattr(compiling, "KINDS", compiling.KINDS[:2])  # batch 1, and a kind compiled after it (ragged batches)
    model = load_model(tiny_hf_model("llama", num_hidden_layers=1))

    def start() -> list[tuple[str, str]]:
        torch._dynamo.reset()
        graphs.clear()
        engine = Engine(model, NumberTokenizer(), EngineConfig(num_blocks=64, block_size=4, max_batched_tokens=16, max_running=2, compile=True))
        engine.warm_up()
        assert engine.compiler.state == "compiled" and engine.compiled_kinds == {"single", "ragged"}
        return list(graphs)

    cold = start()
    assert [kind for kind, _ in cold] == ["single", "ragged"]  # one graph each (ragged: batch 2, then 3), batch 1 first
    assert "Sym(" in cold[0][1]  # the batch-1 graph has its context length dynamic from the start
    warm = start()
    assert warm == cold
