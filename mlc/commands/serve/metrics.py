"""Prometheus metrics through prometheus_client, with vLLM's names, types, label sets and buckets.

Names and labels are vLLM's (`vllm:` prefix; labels model_name and engine, finished_reason on
request_success), so Grafana dashboards and alerts written for vLLM read mlc serve unchanged. The
library writes the exposition format, escaping included. Each server has its own registry (one for all its models when it
serves several: MetricFamilies).
Events (tokens, finished requests, latencies) are counted as they happen, from the engine thread;
the engine's state (running and waiting sequences, KV blocks, prefix-cache and preemption counts)
is read when /metrics is scraped, by a collector bound to the engine once it is loaded. The series
vLLM has deprecated but its example Grafana dashboard still reads (gpu_cache_usage_perc,
time_per_output_token_seconds) are served too. Two series have no vLLM counterpart and keep mlc's
prefix: mlc:kv_cache_free_blocks and mlc:kv_cache_total_blocks, and so do the --compile gauges
(mlc:compiled_decode_kinds, mlc:decode_kinds_to_compile, mlc:compile_failed).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

LABELS = ["model_name", "engine"]
FINISH_REASONS = ("stop", "length", "abort", "error")
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
                160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
                   1920.0, 7680.0]
ITERATION_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def buckets_1_2_5(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to limit (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(m * scale)
        scale *= 10


CONTENT_TYPE = CONTENT_TYPE_LATEST


class MetricFamilies:
    """The metric families of one /metrics registry; each served model adds its own label set (model_name).

    One server with several models (`mlc serve A B`) shares one: Prometheus' text format allows each
    family once, so the models' series are samples of the same families, told apart by model_name.
    """

    def __init__(self, max_model_len: int = 2048):
        self.registry = reg = CollectorRegistry()
        self.members: list[ServeMetrics] = []

        def histogram(name: str, doc: str, buckets: list[float]) -> Any:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=reg)

        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", LABELS, registry=reg)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", LABELS, registry=reg)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.", [*LABELS, "finished_reason"], registry=reg)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds. DEPRECATED: Use vllm:inter_token_latency_seconds instead.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", REQUEST_BUCKETS)
        self.inference = histogram("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.", REQUEST_BUCKETS)
        self.prefill = histogram("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", REQUEST_BUCKETS)
        self.decode = histogram("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", REQUEST_BUCKETS)
        lengths = buckets_1_2_5(max_model_len)
        self.prompt_len = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", lengths)
        self.generation_len = histogram("vllm:request_generation_tokens", "Number of generation tokens processed.", lengths)
        self.max_tokens = histogram("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", lengths)
        self.max_generation_len = histogram("vllm:request_max_num_generation_tokens",
                                            "Histogram of maximum number of requested generation tokens.", lengths)
        self.params_n = histogram("vllm:request_params_n", "Histogram of the n request parameter.", [1, 2, 5, 10, 20])
        # Speculative decoding (n-gram prompt lookup), with vLLM's names: acceptance rate = accepted / draft tokens.
        self.spec_drafts = Counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", LABELS, registry=reg)
        self.spec_draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", LABELS, registry=reg)
        self.spec_accepted_tokens = Counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.", LABELS, registry=reg)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", ITERATION_BUCKETS)
        reg.register(_EngineCollector(self))


class ServeMetrics:
    """One served model's series (label model_name), in its own registry or in one shared with other models."""

    def __init__(self, model_name: str, max_model_len: int = 2048, families: MetricFamilies | None = None):
        self.families = f = families or MetricFamilies(max_model_len)
        self.registry = f.registry
        self.labels = {"model_name": model_name, "engine": "0"}
        values = tuple(self.labels.values())
        self.engine: Any = None  # the engine whose state is read on every scrape (bind_engine)
        self.bound = False  # an engine was bound once: its counters are reported from then on
        self.carried = {"queries": 0.0, "hits": 0.0, "preemptions": 0.0, "evicted": 0.0}  # the counters of engines unbound (unloaded) before
        f.members.append(self)
        for name in ("prompt_tokens", "generation_tokens", "ttft", "itl", "tpot", "e2e", "queue", "inference", "prefill", "decode",
                     "prompt_len", "generation_len", "max_tokens", "max_generation_len", "params_n", "spec_drafts", "spec_draft_tokens",
                     "spec_accepted_tokens", "iteration_tokens"):
            setattr(self, name, getattr(f, name).labels(*values))
        self._success = {r: f.success.labels(*values, r) for r in FINISH_REASONS}

    def finished(self, reason: str, prompt_tokens: int = 0, output_tokens: int = 0, arrival: float | None = None,
                 scheduled: float | None = None, first_token: float | None = None, now: float | None = None) -> None:
        """One sequence finished (stop, length, abort or error); with its times, the request histograms too."""
        self._success[reason].inc()
        if now is None or arrival is None:
            return
        self.e2e.observe(now - arrival)
        self.prompt_len.observe(prompt_tokens)
        self.generation_len.observe(output_tokens)
        if scheduled is not None:
            self.inference.observe(now - scheduled)
            if first_token is not None:
                self.prefill.observe(first_token - scheduled)
                self.decode.observe(now - first_token)

    def bind_engine(self, engine: Any) -> None:
        """Report the engine's state on every scrape."""
        self.engine, self.bound = engine, True

    def unbind_engine(self) -> None:
        """Stop reading the engine (it is being unloaded); its counters carry on into the next engine bound."""
        e = self.engine
        if e is not None:
            self.carried["queries"] += e.pool.prefix_queries
            self.carried["hits"] += e.pool.prefix_hits
            self.carried["preemptions"] += e.scheduler.num_preemptions
            self.carried["evicted"] += e.evictor.num_evicted if e.evictor is not None else 0
        self.engine = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """The current value of one series, by its name without the vllm: prefix (0 when absent)."""
        v = self.registry.get_sample_value(f"vllm:{name}", {**self.labels, **labels})
        return v or 0.0

    def summary(self) -> dict[str, float]:
        """Totals for the run record at shutdown."""

        def mean(name: str) -> float:
            n = self.value(f"{name}_count")
            return self.value(f"{name}_sum") / n if n else 0.0

        return {
            "requests": sum(self.value("request_success_total", finished_reason=r) for r in FINISH_REASONS),
            **{f"requests_{r}": self.value("request_success_total", finished_reason=r) for r in FINISH_REASONS},
            "prompt_tokens": self.value("prompt_tokens_total"),
            "generation_tokens": self.value("generation_tokens_total"),
            "mean_ttft_s": mean("time_to_first_token_seconds"),
            "mean_itl_s": mean("inter_token_latency_seconds"),
            "mean_e2e_s": mean("e2e_request_latency_seconds"),
            "prefix_cache_queries": self.value("prefix_cache_queries_total"),
            "prefix_cache_hits": self.value("prefix_cache_hits_total"),
            "num_preemptions": self.value("num_preemptions_total"),
        }


class _EngineCollector:
    """The bound engines' state, read at each scrape: one family per series, one sample per served model."""

    def __init__(self, families: MetricFamilies):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        live = [m for m in self.families.members if m.engine is not None]
        for name, doc, read in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", lambda e: e.num_running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", lambda e: e.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lambda e: e.pool.usage),
            ("vllm:gpu_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage. DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
             lambda e: e.pool.usage),
            ("mlc:kv_cache_free_blocks", "KV-cache blocks free (cached prefixes included).", lambda e: e.pool.num_free),
            ("mlc:kv_cache_total_blocks", "KV-cache blocks in the pool.", lambda e: e.pool.num_blocks),
            ("mlc:compiled_decode_kinds", "Kinds of decode step running compiled (--compile).", lambda e: len(e.compiled_kinds)),
            ("mlc:decode_kinds_to_compile", "Kinds of decode step --compile compiles (0 without it).",
             lambda e: len(e.compiler.kinds) if e.compiler is not None else 0),
            ("mlc:compile_failed", "1 when --compile failed and the decode step stays eager (the log says why).",
             lambda e: float(e.compiler is not None and e.compiler.state == "failed")),
        ):
            if live:
                g = GaugeMetricFamily(name, doc, labels=LABELS)
                for m in live:
                    g.add_metric(list(m.labels.values()), read(m.engine))
                yield g
        bound = [m for m in self.families.members if m.bound]
        for name, doc, key, read in (
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", "queries", lambda e: e.pool.prefix_queries),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", "hits", lambda e: e.pool.prefix_hits),
            ("vllm:num_preemptions", "Cumulative number of preemption from the engine.", "preemptions", lambda e: e.scheduler.num_preemptions),
            ("mlc:kv_evicted_positions", "KV positions dropped by --kv-policy h2o or scope (a position counts once, not per layer).",
             "evicted", lambda e: e.evictor.num_evicted if e.evictor is not None else 0),
        ):
            if bound:
                c = CounterMetricFamily(name, doc, labels=LABELS)
                for m in bound:
                    c.add_metric(list(m.labels.values()), m.carried[key] + (read(m.engine) if m.engine is not None else 0))
                yield c
        if live:
            g = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                  labels=["block_size", "num_gpu_blocks", "enable_prefix_caching", "engine", "model_name"])
            for m in live:
                c = m.engine.config
                g.add_metric([str(c.block_size), str(c.num_blocks), str(c.enable_prefix_caching), m.labels["engine"], m.labels["model_name"]], 1)
            yield g
