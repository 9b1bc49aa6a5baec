"""Prometheus metrics with vLLM's names (prefix `mlc:` instead of `vllm:`), in the text exposition format.

A few counters and histograms need no client library: the engine thread updates plain numbers
(each update is one bytecode-level operation under the GIL) and /metrics renders them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def render(self, labels: str) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            lines.append(f'{self.name}_bucket{{{labels},le="{bound}"}} {running}')
        lines.append(f'{self.name}_bucket{{{labels},le="+Inf"}} {self.n}')
        lines.append(f"{self.name}_sum{{{labels}}} {self.total}")
        lines.append(f"{self.name}_count{{{labels}}} {self.n}")
        return lines


class ServeMetrics:
    def __init__(self, model_name: str):
        self.labels = f'model_name="{model_name}"'
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests_finished: dict[str, int] = {}
        self.ttft = Histogram("mlc:time_to_first_token_seconds", "Time to first token.")
        self.itl = Histogram("mlc:inter_token_latency_seconds", "Time between consecutive output tokens.")
        self.e2e = Histogram("mlc:e2e_request_latency_seconds", "End-to-end request latency.")
        self.queue = Histogram("mlc:request_queue_time_seconds", "Time a request waited before its first step.")
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.counters: dict[str, tuple[str, Callable[[], float]]] = {}

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help, read)

    def counter(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.counters[name] = (help, read)

    def finished(self, reason: str) -> None:
        self.requests_finished[reason] = self.requests_finished.get(reason, 0) + 1

    def render(self) -> str:
        lines: list[str] = []
        for name, (help, read) in self.gauges.items():
            lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name}{{{self.labels}}} {read()}"]
        counters = {
            "mlc:prompt_tokens_total": ("Prompt tokens processed.", lambda: self.prompt_tokens),
            "mlc:generation_tokens_total": ("Generated tokens.", lambda: self.generation_tokens),
            **self.counters,
        }
        for name, (help, read) in counters.items():
            lines += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name}{{{self.labels}}} {read()}"]
        lines += ["# HELP mlc:request_success_total Finished requests by finish reason.", "# TYPE mlc:request_success_total counter"]
        for reason, count in sorted(self.requests_finished.items()):
            lines.append(f'mlc:request_success_total{{{self.labels},finished_reason="{reason}"}} {count}')
        for hist in (self.ttft, self.itl, self.e2e, self.queue):
            lines += hist.render(self.labels)
        return "\n".join(lines) + "\n"

    def summary(self) -> dict[str, float]:
        """Totals for the run record at shutdown."""
        mean = lambda h: h.total / h.n if h.n else 0.0  # noqa: E731
        return {
            "requests": sum(self.requests_finished.values()),
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "mean_ttft_s": mean(self.ttft),
            "mean_itl_s": mean(self.itl),
            "mean_e2e_s": mean(self.e2e),
            **{name.removeprefix("mlc:"): read() for name, (_, read) in self.counters.items()},
        }
