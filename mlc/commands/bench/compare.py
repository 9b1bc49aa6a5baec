"""Two bench results side by side, and CI checks such as 'tpot_p99>+5%' that fail on a regression.

Results are `mlc bench serve --save-result` files, or `vllm bench serve --save-result` files (the same
metric names). A check is METRIC OP CHANGE: METRIC a result key (p99_tpot_ms, output_throughput) or
its short form (tpot_p99, ttft_mean, e2el_median); OP > or <; CHANGE a signed number, in percent of A
with a % sign, else in the metric's own unit. 'tpot_p99>+5%' fails when B's p99 TPOT is more than 5%
above A's; 'output_throughput<-10%' when B's throughput is more than 10% below A's; 'failed>0' when B
failed more requests than A.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlc.errors import InputError, MlcUsageError

FIRST = ["completed", "failed", "duration", "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
         "max_output_tokens_per_s", "max_concurrent_requests", "total_input_tokens", "total_output_tokens"]
NOT_METRICS = {"num_prompts", "burstiness", "max_concurrency", "request_rate", "ramp_up_start_rps", "ramp_up_end_rps"}
LOWER_IS_BETTER = re.compile(r"_ms$|^failed$|^duration$")
CHECK = re.compile(r"^\s*([A-Za-z0-9_.]+)\s*([<>])\s*([+-]?\d+(?:\.\d+)?)\s*(%?)\s*$")
SHORT = re.compile(r"^(ttft|tpot|itl|e2el|client_queue_time)_(mean|median|std|p\d+(?:\.\d+)?)$")


def load_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} does not exist", "give two result files from `mlc bench serve --save-result`") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path} is not a JSON file", "give a result file from `mlc bench serve --save-result`") from None
    if not isinstance(data, dict) or "completed" not in data or "output_throughput" not in data:
        raise InputError(f"{path} is not a bench result (no completed/output_throughput)", "give a result file from `mlc bench serve --save-result`")
    return data


def metric_names(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The numeric metrics both results have, throughputs first, then latency statistics in file order."""
    def numeric(d: dict[str, Any], k: str) -> bool:
        return isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool) and k not in NOT_METRICS

    common = [k for k in a if numeric(a, k) and numeric(b, k)]
    return [k for k in FIRST if k in common] + [k for k in common if k not in FIRST]


def metric_key(name: str) -> str:
    """A result key from a check's metric name: tpot_p99 -> p99_tpot_ms, ttft_mean -> mean_ttft_ms."""
    m = SHORT.match(name)
    return f"{m.group(2)}_{m.group(1)}_ms" if m else name


@dataclass
class Check:
    spec: str
    key: str
    op: str
    limit: float
    percent: bool

    def change(self, a: float, b: float) -> float:
        if not self.percent:
            return b - a
        if a == 0:
            return 0.0 if b == 0 else math.copysign(math.inf, b)
        return (b - a) / abs(a) * 100

    def fails(self, a: float, b: float) -> bool:
        c = self.change(a, b)
        return c > self.limit if self.op == ">" else c < self.limit


def parse_check(spec: str) -> Check:
    m = CHECK.match(spec)
    if not m:
        raise MlcUsageError(f"bad --fail-on {spec!r}: expected METRIC>CHANGE or METRIC<CHANGE", "for example --fail-on 'tpot_p99>+5%' or 'output_throughput<-10%'")
    name, op, value, pct = m.groups()
    return Check(spec, metric_key(name), op, float(value), pct == "%")


def compare(a: dict[str, Any], b: dict[str, Any], checks: list[Check]) -> dict[str, Any]:
    """Every common metric with its change, and each check's verdict."""
    rows = []
    for k in metric_names(a, b):
        x, y = float(a[k]), float(b[k])
        pct = Check("", k, ">", 0, True).change(x, y)
        both_int = isinstance(a[k], int) and isinstance(b[k], int)
        rows.append({"metric": k, "a": a[k], "b": b[k], "change": b[k] - a[k] if both_int else y - x, "change_pct": None if math.isinf(pct) else pct,
                     "better": None if x == y else (y < x) == bool(LOWER_IS_BETTER.search(k))})
    verdicts = []
    for c in checks:
        for side, d in (("A", a), ("B", b)):
            if not isinstance(d.get(c.key), (int, float)):
                raise MlcUsageError(f"--fail-on {c.spec!r}: result {side} has no metric {c.key!r}", "metrics: " + ", ".join(metric_names(a, b)[:12]) + ", ...")
        change = c.change(float(a[c.key]), float(b[c.key]))
        verdicts.append({"check": c.spec, "metric": c.key, "change": change, "unit": "%" if c.percent else "", "failed": c.fails(float(a[c.key]), float(b[c.key]))})
    return {"metrics": rows, "checks": verdicts, "failed": any(v["failed"] for v in verdicts)}


def table(report: dict[str, Any], a_name: str, b_name: str) -> Any:  # -> rich.table.Table
    from rich.table import Table

    t = Table("metric", a_name, b_name, "change", "%", title=f"{a_name} -> {b_name}", title_justify="left")
    for r in report["metrics"]:
        colour = "" if r["better"] is None else ("green" if r["better"] else "red")
        pct = "" if r["change_pct"] is None else f"{r['change_pct']:+.1f}%"
        t.add_row(r["metric"], _num(r["a"]), _num(r["b"]), _num(r["change"], signed=True), f"[{colour}]{pct}[/{colour}]" if colour else pct)
    return t


def _num(v: Any, signed: bool = False) -> str:
    if isinstance(v, int):
        return f"{v:+,}" if signed else f"{v:,}"
    return f"{v:+,.2f}" if signed else f"{v:,.2f}"
