"""`mlc serve --min-replicas 1 --max-replicas 2` on a real local Ray instance, against a single `mlc serve` of the same model.

One deployment serves every test here, in order (Ray's start costs tens of seconds on two cores):
the API answers as the single server does; load scales it from one replica to two; requests with a
long shared prompt start land on the replica that cached it; a replica killed with SIGKILL under load
fails its requests cleanly while the service goes on.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serve.conftest import TINY_NAME, http, start_server

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.slow
# Seconds one request may take: generous, as on a 2-core machine shared by other jobs a step can take half a second;
# a hang (what the kill test looks for) never ends, so it still fails.
LOADED = 300


@pytest.fixture(scope="module")
def replicas(tiny_chat_model, tmp_path_factory):
    # The settings of the single tiny_server (conftest), so both answer alike: its torch thread count too (a matmul split
    # over another number of threads rounds differently, and a random model's greedy picks follow); autoscaling aims
    # at 2 requests per replica.
    import torch

    s = start_server(tiny_chat_model, tmp_path_factory.mktemp("replicas"), "--served-model-name", TINY_NAME, "--dtype", "float32",
                     "--kv-cache-memory", "32MiB", "--max-model-len", "128", "--max-queue", "16",
                     "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "2",
                     "--threads", str(torch.get_num_threads()), timeout=600)
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


def replica_metric(server, name):
    """{replica id: value} of one metric at the deployment's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    _, text = http(server, "GET", "/metrics", timeout=LOADED)
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[s.labels["replica"]] = out.get(s.labels["replica"], 0) + s.value
    return out


def run_record(server):
    (path,) = server.runs_dir.glob("*/run.json")
    return json.loads(path.read_text())


def replica_pids(server):
    return {r["replica"]: r["pid"] for r in run_record(server)["summary"]["replicas"]}


def strip(body):
    """A response without what differs between any two calls (ids, timestamps) or servers (cached_tokens: what each
    server's prefix cache holds depends on the requests other tests sent it before)."""
    if isinstance(body, dict):
        return {k: strip(v) for k, v in body.items() if k not in ("id", "created", "cached_tokens")}
    return [strip(v) for v in body] if isinstance(body, (list, tuple)) else body


def sse_texts(server, body):
    import urllib.request

    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer test-key"})
    with urllib.request.urlopen(req, timeout=120) as r:
        events = [e.removeprefix("data: ") for e in r.read().decode().split("\n\n") if e.startswith("data: ")]
    return [strip(json.loads(e)) if e != "[DONE]" else e for e in events]


def test_replicas_answer_every_request_as_a_single_server(replicas, tiny_server):
    requests = [
        ("POST", "/v1/completions", {"model": TINY_NAME, "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}),
        ("POST", "/v1/completions", {"model": TINY_NAME, "prompt": [1, 2, 3], "max_tokens": 8, "n": 2, "seed": 7, "temperature": 1.0,
                                     "logprobs": 2}),
        ("POST", "/v1/chat/completions", {"model": TINY_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10,
                                          "temperature": 0}),
        ("POST", "/v1/chat/completions", {"model": TINY_NAME, "messages": [{"role": "user", "content": "a number"}], "max_tokens": 24,
                                          "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {
                                              "name": "n", "schema": {"type": "object", "properties": {"n": {"type": "integer"}},
                                                                      "required": ["n"]}}}}),
        ("POST", "/v1/completions", {"model": TINY_NAME, "prompt": "x", "max_tokens": "3"}),  # a 400 naming the field
        ("POST", "/v1/completions", {"model": "other", "prompt": "x"}),  # 404
        ("POST", "/tokenize", {"prompt": "hello world"}),
        ("GET", "/v1/models", None),
    ]
    for method, path, body in requests:
        assert strip(http(replicas, method, path, body)) == strip(http(tiny_server, method, path, body)), (path, body)
    assert http(replicas, "GET", "/v1/models", key="wrong")[0] == 401
    stream = {"model": TINY_NAME, "prompt": "Once upon", "max_tokens": 10, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}}
    assert sse_texts(replicas, stream) == sse_texts(tiny_server, stream)
    record = run_record(replicas)
    assert record["inputs"][0]["role"] == "model" and record["inputs"][0]["hash"]


def test_load_scales_one_replica_to_two(replicas):
    assert len(replica_metric(replicas, "vllm:num_requests_running")) == 1
    body = {"model": TINY_NAME, "prompt": "load", "max_tokens": 100, "ignore_eos": True, "temperature": 0}
    deadline = time.monotonic() + 240
    with ThreadPoolExecutor(8) as pool:
        while len(replica_metric(replicas, "vllm:num_requests_running")) < 2:
            assert time.monotonic() < deadline, "no second replica after 240 s of 8 requests in flight"
            list(pool.map(lambda _: http(replicas, "POST", "/v1/completions", body, timeout=LOADED), range(8)))
    replicas_seen = run_record(replicas)["summary"]["replicas"]
    assert all(r["pid"] > 0 and r["host"] for r in replicas_seen)


def test_a_long_shared_prompt_start_lands_on_the_replica_that_cached_it(replicas):
    assert len(replica_metric(replicas, "vllm:num_requests_running")) == 2
    for k in range(4):  # by chance alone, four of four pairs would meet with probability 1/16
        shared = f"Topic {k}: " + " ".join(f"w{k}{i}" for i in range(16))  # about 60 tokens: --max-model-len is 128
        status, first = http(replicas, "POST", "/v1/completions", {"model": TINY_NAME, "prompt": shared + " first", "max_tokens": 1})
        assert status == 200, first
        second = http(replicas, "POST", "/v1/completions", {"model": TINY_NAME, "prompt": shared + " second", "max_tokens": 1})[1]
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, k


def test_a_replica_killed_under_load_fails_its_requests_cleanly_and_the_service_goes_on(replicas):
    body = {"model": TINY_NAME, "max_tokens": 120, "ignore_eos": True, "temperature": 0}

    def one(i):
        start = time.monotonic()
        if i % 2:
            status, text = http(replicas, "POST", "/v1/completions", {**body, "prompt": f"req {i}", "stream": True}, timeout=LOADED)
            # A stream the dead replica had begun ends with an error event; one routed to it after its death gets a
            # JSON error answer (503) before any event.
            failed = not isinstance(text, str) or '"error"' in text or not text.rstrip().endswith("data: [DONE]")
        else:
            status, text = http(replicas, "POST", "/v1/completions", {**body, "prompt": f"req {i}"}, timeout=LOADED)
            failed = status != 200
        return status, failed, time.monotonic() - start

    # Each replica's pid is read before the load starts, so the kill follows the moment a replica is seen busy (reading
    # the run record under load took long enough, once, for the busy replica to finish everything it held). 24 requests
    # over 12 clients keep both replicas busy for two rounds.
    deadline = time.monotonic() + 120
    while set(replica_metric(replicas, "vllm:num_requests_running")) - set(pids := replica_pids(replicas)):
        assert time.monotonic() < deadline, "a running replica never appeared in the run record"
        time.sleep(0.2)  # the record lists a replica once the deployment has written its first sighting
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        while not (busy := [r for r, n in replica_metric(replicas, "vllm:num_requests_running").items() if n > 0]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(pids[busy[0]], signal.SIGKILL)
        results = [f.result(timeout=LOADED + 60) for f in futures]  # none hangs: a hang would time out here
    failed = [r for r in results if r[1]]
    assert failed, "the killed replica had requests in flight, which must end with an error"
    assert all(status in (200, 503) for status, _, _ in results)
    status, answer = http(replicas, "POST", "/v1/completions", {**body, "prompt": "after", "max_tokens": 4}, timeout=LOADED)
    assert status == 200 and answer["usage"]["completion_tokens"] == 4
