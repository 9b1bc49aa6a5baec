"""The parts of `mlc serve --replicas` that run without Ray: routing keys, prefix hashes, /metrics merging, the CLI checks."""

from __future__ import annotations

import hashlib
import json

import pytest

from mlc.commands.serve.replicas import check_plan, merge_metrics
from mlc.commands.serve.routing import CHUNK, prefix_hashes, route_key
from mlc.errors import MlcUsageError


def test_route_key_is_the_prompt_or_the_messages_of_generation_requests_only():
    assert route_key("/v1/completions", json.dumps({"model": "m", "prompt": "abc"}).encode()) == "abc"
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    key = route_key("/v1/chat/completions", json.dumps({"messages": messages, "model": "m"}).encode())
    assert key == json.dumps(messages, separators=(",", ":"))  # the same messages give the same key, whatever else differs
    assert route_key("/tokenize", b'{"prompt": "abc"}') is None
    assert route_key("/v1/completions", b"[1, 2]") is None and route_key("/v1/completions", b"{not json") is None
    assert route_key("/v1/completions", b"[" * 100_000) is None  # nesting too deep for json: the replica answers the 400


def test_prefix_hashes_are_the_hashes_of_each_whole_chunk_prefix():
    text = "x" * (3 * CHUNK + 5)
    expected = [hashlib.blake2b(text[:n].encode(), digest_size=16).digest() for n in (CHUNK, 2 * CHUNK, 3 * CHUNK)]
    assert prefix_hashes(text) == expected
    assert prefix_hashes("y" * (CHUNK - 1)) == []
    shared = "s" * (2 * CHUNK)
    assert prefix_hashes(shared + "a" * CHUNK)[:2] == prefix_hashes(shared + "b" * CHUNK)[:2]


def test_merged_metrics_keep_every_replicas_samples_with_a_replica_label():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    def replica_text(tokens: float, running: float, latencies: list[float]) -> str:
        reg = CollectorRegistry()
        Counter("vllm:prompt_tokens", "Prompt tokens.", ["model_name"], registry=reg).labels("m").inc(tokens)
        Gauge("vllm:num_requests_running", "Running.", ["model_name"], registry=reg).labels("m").set(running)
        h = Histogram("vllm:e2e_request_latency_seconds", "E2E.", ["model_name"], buckets=(1.0, 5.0), registry=reg).labels("m")
        for v in latencies:
            h.observe(v)
        return generate_latest(reg).decode()

    merged = merge_metrics({"a": replica_text(7, 1, [0.5]), "b": replica_text(3, 0, [2.0, 9.0])}).decode()
    samples = {(s.name, s.labels.get("replica"), s.labels.get("le")): s.value
               for fam in text_string_to_metric_families(merged) for s in fam.samples}
    assert samples[("vllm:prompt_tokens_total", "a", None)] == 7 and samples[("vllm:prompt_tokens_total", "b", None)] == 3
    assert samples[("vllm:num_requests_running", "a", None)] == 1 and samples[("vllm:num_requests_running", "b", None)] == 0
    assert samples[("vllm:e2e_request_latency_seconds_bucket", "b", "5.0")] == 1
    assert samples[("vllm:e2e_request_latency_seconds_count", "b", None)] == 2
    assert merged.count("# TYPE vllm:prompt_tokens_total counter") == 1  # one family, both replicas' samples


@pytest.mark.parametrize("args, expected", [
    ((None, None, None), None), ((3, None, None), (3, 3)), ((None, 1, 4), (1, 4)), ((None, 2, None), (2, 2)), ((None, None, 3), (1, 3)),
])
def test_replica_counts(args, expected):
    assert check_plan(*args) == expected


@pytest.mark.parametrize("args", [(2, 1, None), (None, 3, 2)])
def test_contradictory_replica_counts_are_usage_errors(args):
    with pytest.raises(MlcUsageError):
        check_plan(*args)


@pytest.mark.parametrize("args, message", [
    (["--replicas", "2", "--engine", "vllm"], "replicas on Ray Serve run mlc's engine"),
    (["--ray-address", "auto"], "--ray-address places replicas"),
    (["--replicas", "2", "--target-ongoing-requests", "4"], "--target-ongoing-requests sets autoscaling"),
    (["--replicas", "2", "--min-replicas", "1"], "--replicas is a fixed count"),
])
def test_replica_options_that_would_be_ignored_are_refused(tmp_path, run_mlc, args, message):
    code, _, err = run_mlc("serve", str(tmp_path), *args)
    assert code == 2 and message in err
