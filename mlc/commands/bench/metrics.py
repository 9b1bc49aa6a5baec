"""Serving metrics from per-request outcomes, with the definitions of `vllm bench serve`.

From vllm/benchmarks/serve.py (calculate_metrics):
- completed / failed: requests that streamed at least one token / all others. Failed requests count
  in `failed` and nowhere else: not in latencies, tokens or throughput.
- duration: from the first request's scheduled start to the last response's end (the whole run).
- request throughput = completed / duration; output throughput = output tokens / duration; total
  token throughput = (input + output tokens) / duration.
- TTFT, ITL and E2EL as the client measured them (mlc/commands/bench/client.py); TPOT per request =
  (E2EL - TTFT) / (output tokens - 1), only for requests with more than one output token.
- mean, median, std (population) and percentiles (numpy's linear interpolation) in milliseconds;
  ITL statistics pool every gap of every request. An empty list gives 0, as in vLLM.
- goodput = completed requests meeting every given SLO (TTFT, TPOT, E2EL, each <= its bound in ms)
  per second of duration; a request with one output token has TPOT 0 for this test.
- peak output tokens/s: token messages counted in one-second buckets from the earliest start; peak
  concurrency: the most requests in flight at once (half-open [start, end) intervals).
- token counts: the server's usage; without it, the local tokenizer's count of the streamed text.

Differences: when neither usage nor a tokenizer gives a request's output length, mlc refuses to
report rather than counting 1 token as vLLM does; E2EL percentiles are always reported (vLLM
reports TTFT, TPOT and ITL unless --percentile-metrics says otherwise).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from mlc.commands.bench.client import Outcome
from mlc.errors import MlcUsageError

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCIES = ("ttft", "tpot", "itl", "e2el")


def parse_goodput(specs: Sequence[str]) -> dict[str, float]:
    """{'ttft': ms, ...} from 'ttft:500 tpot:50' (pairs separated by spaces or commas, or given one per flag)."""
    slos: dict[str, float] = {}
    for item in (p for spec in specs for p in re.split(r"[\s,]+", spec.strip()) if p):
        name, sep, value = item.partition(":")
        try:
            ms = float(value) if sep else None
        except ValueError:
            ms = None
        if name not in SLO_METRICS or ms is None or not ms >= 0:
            raise MlcUsageError(
                f"bad SLO {item!r}: expected NAME:MILLISECONDS with NAME one of {', '.join(SLO_METRICS)}",
                "for example --goodput 'ttft:500 tpot:50'",
            )
        slos[name] = ms
    return slos


def parse_percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < p <= 100 for p in values):
        raise MlcUsageError(f"bad --percentiles {text!r}", "give comma-separated numbers in (0, 100], e.g. 50,90,99")
    return values


@dataclass
class Counted:
    """A completed request's outcome with its token counts settled."""

    outcome: Outcome
    input_tokens: int
    output_tokens: int

    @property
    def tpot(self) -> float:
        o = self.outcome
        return (o.latency - o.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def _stats(name: str, values: list[float], percentiles: list[float]) -> dict[str, float]:
    arr = np.asarray(values if values else [0.0], dtype=float) * 1000.0
    out = {f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr)), f"std_{name}_ms": float(arr.std())}
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def compute(counted: list[Counted], failed: int, duration: float, percentiles: list[float], slos: dict[str, float], client_queue: bool = False) -> dict[str, Any]:
    """The result metrics (vLLM's names) of one run."""
    total_in = sum(c.input_tokens for c in counted)
    total_out = sum(c.output_tokens for c in counted)
    ttfts = [c.outcome.ttft for c in counted]
    tpots = [c.tpot for c in counted if c.output_tokens > 1]
    itls = [gap for c in counted for gap in c.outcome.itl]
    e2els = [c.outcome.latency for c in counted]
    good = 0
    for c in counted:
        value = {"ttft": c.outcome.ttft, "tpot": c.tpot, "e2el": c.outcome.latency}
        good += all(value[k] <= ms / 1000.0 for k, ms in slos.items())
    result: dict[str, Any] = {
        "duration": duration,
        "completed": len(counted),
        "failed": failed,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(counted) / duration,
        "request_goodput": good / duration if slos else None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        **peaks([c.outcome for c in counted]),
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        result.update(_stats(name, values, percentiles))
    if client_queue:  # with --max-concurrency, as vLLM: how long requests waited for a slot
        result.update(_stats("client_queue_time", [c.outcome.queued for c in counted], percentiles))
    return result


def peaks(outcomes: list[Outcome]) -> dict[str, float]:
    """Peak output token messages per one-second bucket, and the most requests in flight at once."""
    if not outcomes:
        return {"max_output_tokens_per_s": 0.0, "max_concurrent_requests": 0}
    origin = min(o.start for o in outcomes)
    span = max(o.start + o.latency for o in outcomes) - origin
    buckets = np.zeros(int(np.ceil(span)) + 1)
    for o in outcomes:
        times = o.start + o.ttft + np.concatenate([[0.0], np.cumsum(o.itl)])
        idx = (times - origin).astype(int)
        np.add.at(buckets, idx[(idx >= 0) & (idx < len(buckets))], 1)
    events = sorted([(o.start, 1) for o in outcomes] + [(o.start + o.latency, -1) for o in outcomes])  # ends sort before starts at a tie
    now = peak = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return {"max_output_tokens_per_s": float(buckets.max()), "max_concurrent_requests": peak}


def per_request(counted: list[Counted], failures: list[Outcome], origin: float) -> list[dict[str, Any]]:
    """Every request's timings (seconds from the run's start) for --save-detailed and the plots."""
    rows = [
        {"index": c.outcome.index, "success": True, "start": c.outcome.start - origin, "queued": c.outcome.queued, "ttft": c.outcome.ttft,
         "itl": c.outcome.itl, "e2el": c.outcome.latency, "tpot": c.tpot, "input_tokens": c.input_tokens, "output_tokens": c.output_tokens, "error": ""}
        for c in counted
    ]
    rows += [{"index": o.index, "success": False, "start": o.start - origin, "queued": o.queued, "error": o.error} for o in failures]
    return sorted(rows, key=lambda r: r["index"])
