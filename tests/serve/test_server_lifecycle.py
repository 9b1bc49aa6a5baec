"""Loading, queue limits, draining and the run record of a live `mlc serve`."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import openai
import pytest

from mlc.commands.serve.api import ServerState, build_app
from tests.serve.conftest import start_server


def asgi_call(app, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """One request straight into the ASGI app (no socket)."""
    sent = []
    payload = json.dumps(body or {}).encode()

    async def receive():
        return {"type": "http.request", "body": payload, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [(b"content-type", b"application/json")], "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(data) if data else {}


def test_a_loading_or_draining_server_answers_503():
    state = ServerState("m")
    app = build_app(state)
    status, body = asgi_call(app, "POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 503 and body["error"]["code"] == "loading"
    state.draining = True
    assert asgi_call(app, "GET", "/health")[0] == 503
    status, body = asgi_call(app, "POST", "/v1/completions", {"model": "m", "prompt": "hi"})
    assert status == 503 and body["error"]["code"] == "draining"


def test_health_is_200_only_while_the_engine_loop_runs(tiny_hf_model):
    from mlc.commands.serve.engine import Engine, EngineConfig
    from mlc.models import load_model
    from tests.serve.test_engine_models import NumberTokenizer

    engine = Engine(load_model(tiny_hf_model("llama")), NumberTokenizer(), EngineConfig(num_blocks=8, block_size=4))
    app = build_app(ServerState("m", engine=engine))
    status, body = asgi_call(app, "GET", "/health")
    assert status == 503 and body["error"]["code"] == "engine_failed"  # loaded, but its loop is not running
    engine.start()
    try:
        assert wait_for(engine.healthy, 10) and asgi_call(app, "GET", "/health")[0] == 200
    finally:
        engine.stop()
    assert asgi_call(app, "GET", "/health")[0] == 503


@pytest.fixture(scope="module")
def small_server(smollm2_dir, tmp_path_factory):
    """One request runs at a time and two may wait: the queue limit is easy to reach."""
    s = start_server(smollm2_dir, tmp_path_factory.mktemp("serve-small"), "--dtype", "bfloat16", "--kv-cache-memory", "64MiB",
                     "--max-model-len", "512", "--max-running", "1", "--max-queue", "2", "--grace-period", "60")
    yield s
    s.stop()


def wait_for(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.realmodel
def test_health_was_503_while_the_model_loaded(small_server):
    assert 503 in small_server.health_seen and small_server.health_seen[-1] == 200


@pytest.mark.realmodel
def test_a_full_queue_answers_429_and_frees_up_again(small_server):
    name = small_server.client().models.list().data[0].id
    release = threading.Event()

    def hold():  # a streaming client that walks away once told to (or once it is finally served)
        stream = small_server.client(timeout=300).completions.create(model=name, prompt="Count:", max_tokens=400, stream=True, extra_body={"ignore_eos": True})
        for _ in stream:
            if release.is_set():
                stream.close()
                return

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(3)]  # one runs, two wait
    for t in threads:
        t.start()
    assert wait_for(lambda: small_server.metrics()["vllm:num_requests_waiting"] == 2)
    with pytest.raises(openai.RateLimitError) as e:
        small_server.client().completions.create(model=name, prompt="one more", max_tokens=2)
    assert e.value.body["code"] == "queue_full"
    release.set()
    for t in threads:
        t.join(timeout=120)
    assert wait_for(lambda: small_server.metrics()["vllm:num_requests_running"] == 0)
    assert small_server.client().completions.create(model=name, prompt="now", max_tokens=2).usage.completion_tokens >= 1


@pytest.mark.realmodel
def test_n_counts_against_the_queue_in_sequences(small_server):
    """--max-queue 2: n=3 could never be queued (a 400 naming n, not a pass); n=2 fits."""
    name = small_server.client().models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as e:
        small_server.client().completions.create(model=name, prompt="hi", max_tokens=2, n=3)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:  # two prompts, two sequences each
        small_server.client().completions.create(model=name, prompt=["hi", "ho"], max_tokens=2, n=2)
    assert e.value.body["param"] == "n"
    assert len(small_server.client().completions.create(model=name, prompt="hi", max_tokens=2, n=2).choices) == 2


@pytest.mark.realmodel
def test_sigterm_finishes_in_flight_requests_exits_0_and_records_the_run(small_server):
    name = small_server.client().models.list().data[0].id
    stream = small_server.client(timeout=120).completions.create(model=name, prompt="A long story:", max_tokens=30, stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)
    small_server.proc.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    assert len(first.choices[0].text + "".join(c.choices[0].text for c in rest if c.choices)) > 0
    assert small_server.proc.wait(timeout=60) == 0
    run_json = json.loads(next(small_server.runs_dir.glob("*serve*/run.json")).read_text())
    assert run_json["status"] == "completed" and run_json["inputs"][0]["role"] == "model"
    assert run_json["summary"]["generation_tokens"] >= 30
