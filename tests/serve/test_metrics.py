"""/metrics as vLLM exposes it: names, types and label sets, escaped so a Prometheus parser reads them back."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.conftest import TINY_NAME, http

# Every series vLLM's example Grafana dashboard (examples/online_serving/prometheus_grafana/grafana.json) queries.
DASHBOARD = [
    "vllm:e2e_request_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum", "vllm:e2e_request_latency_seconds_count",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:time_per_output_token_seconds_bucket", "vllm:time_per_output_token_seconds_sum", "vllm:time_per_output_token_seconds_count",
    "vllm:num_requests_running", "vllm:num_requests_waiting",
    "vllm:time_to_first_token_seconds_bucket", "vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count",
    "vllm:gpu_cache_usage_perc", "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_bucket",
    "vllm:request_success_total", "vllm:request_queue_time_seconds_sum", "vllm:request_prefill_time_seconds_sum",
    "vllm:request_decode_time_seconds_sum", "vllm:request_max_num_generation_tokens_sum",
]
# Types as vLLM declares them (vllm/v1/metrics/loggers.py).
TYPES = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge", "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter", "vllm:request_success": "counter",
    "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter", "vllm:num_preemptions": "counter",
    "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram", "vllm:request_generation_tokens": "histogram",
}


def scrape(server) -> dict:
    status, text = http(server, "GET", "/metrics", key=None)
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict, sample: str, **labels: str) -> float:
    return sum(s.value for f in families.values() for s in f.samples if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.realmodel
def test_metrics_have_vllms_names_types_and_labels_and_a_quoted_model_name_reads_back(tiny_server):
    families = scrape(tiny_server)
    samples = {s.name for f in families.values() for s in f.samples}
    assert not [n for n in DASHBOARD if n not in samples]
    assert {name: families[name].type for name in TYPES} == TYPES
    vllm = [s for f in families.values() if f.name.startswith("vllm:") and f.name != "vllm:cache_config_info" for s in f.samples]
    assert vllm and all(s.labels["model_name"] == TINY_NAME and s.labels["engine"] == "0" for s in vllm)
    reasons = {s.labels["finished_reason"] for s in families["vllm:request_success"].samples if s.name.endswith("_total")}
    assert reasons == {"stop", "length", "abort", "error"}


@pytest.mark.realmodel
def test_one_request_moves_each_counter_and_histogram_by_what_it_did(tiny_server):
    before = scrape(tiny_server)
    prompt, n_out = [7, 8, 9, 10, 11], 6
    status, body = http(tiny_server, "POST", "/v1/completions",
                        {"model": TINY_NAME, "prompt": prompt, "max_tokens": n_out, "ignore_eos": True, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == n_out
    after = scrape(tiny_server)

    def delta(sample: str, **labels: str) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    assert delta("vllm:prompt_tokens_total") == len(prompt)
    assert delta("vllm:generation_tokens_total") == n_out
    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("vllm:request_success_total") == 1
    assert delta("vllm:time_to_first_token_seconds_count") == 1 and delta("vllm:e2e_request_latency_seconds_count") == 1
    assert delta("vllm:inter_token_latency_seconds_count") == n_out - 1
    assert delta("vllm:request_generation_tokens_sum") == n_out and delta("vllm:request_prompt_tokens_sum") == len(prompt)
    assert delta("vllm:request_generation_tokens_bucket", le="5.0") == 0 and delta("vllm:request_generation_tokens_bucket", le="10.0") == 1
    assert value(after, "vllm:num_requests_running") == 0 and value(after, "vllm:kv_cache_usage_perc") == 0
