"""What a run page shows beyond its record: metric curves, and a view for each kind of result mlc writes.

Each view reads the files its command really writes (nothing else is assumed):
    train, eval, ...  metrics.jsonl                      curves against step (or trial), several runs overlaid
    quantize          report.json, the model's config.json   perplexity before/after, bits per parameter, per-layer settings
    merge-search      artifacts/search/{pareto,trials}.json  every trial, the Pareto front, the pool and the best
    bench-serve       artifacts/result/result.json       metrics; with --save-detailed, latency CDFs and the request timeline
    bench-sweep       artifacts/sweep/sweep.json         tokens/s per user against aggregate tokens/s, the front, the SLO pick
    train of a MoE    metrics.jsonl's moe/expert_share   each expert's share of the routing slots over steps, per layer
A file that is missing or does not have the expected shape makes its view say so, never the page fail.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from markupsafe import Markup

from mlc.commands.runs.ui import svg
from mlc.runs.catalog import metrics, read_json_file, run_json_file
from mlc.runs.record import RunRecord

FIRST_CURVES = ("loss", "eval_loss", "eval_ppl", "lr", "grad_norm", "tokens_per_s", "mfu", "macro", "aux_loss")
NOT_CURVES = {"time", "step", "trial", "epoch"}
MAX_CURVES = 24


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Section:
    title: str
    view: str  # data-view in the page, for people's stylesheets and the tests
    charts: list[Markup] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def x_key(rows: list[dict[str, Any]]) -> str | None:
    """What a run's metrics are plotted against: step for training, trial for searches, else the row order."""
    for key in ("step", "trial"):
        if sum(_is_num(r.get(key)) for r in rows) >= max(1, len(rows) // 2):
            return key
    return None


def curves(records: list[RunRecord]) -> list[Markup]:
    """One chart per metric that has at least two points in some run, each run a series (overlaid when several)."""
    per_run = []
    for r in records:
        rows = metrics(r)
        xk = x_key(rows)
        per_run.append((r, rows, xk))
    keys: dict[str, int] = {}
    for _, rows, xk in per_run:
        counts: dict[str, int] = {}
        for row in rows:
            for k, v in row.items():
                if k not in NOT_CURVES and k != xk and _is_num(v):
                    counts[k] = counts.get(k, 0) + 1
        for k, n in counts.items():
            keys[k] = max(keys.get(k, 0), n)
    names = [k for k in FIRST_CURVES if keys.get(k, 0) >= 2] + sorted(k for k, n in keys.items() if n >= 2 and k not in FIRST_CURVES)
    charts = []
    for key in names[:MAX_CURVES]:
        series = []
        for r, rows, xk in per_run:
            pts = [(row.get(xk) if xk else i, row[key]) for i, row in enumerate(rows) if _is_num(row.get(key))]
            if pts:
                series.append(svg.Series(series_name(r, len(per_run)), [p[0] for p in pts], [p[1] for p in pts], markers=len(pts) <= 40))
        x_label = {"step": "step", "trial": "trial"}.get(per_run[0][2] or "", "row of metrics.jsonl")
        charts.append(svg.chart(series, key, x_label, key, kind="curve"))
    return charts


def series_name(r: RunRecord, runs: int) -> str:
    return f"{r.command} {r.id.rsplit('-', 1)[-1]}" if runs > 1 else r.command


# ---- result views --------------------------------------------------------------------------------------------------

def sections(record: RunRecord, compare: list[RunRecord], users: Callable[[RunRecord], list[RunRecord]]) -> list[Section]:
    """The result views that apply to this run (by the files it has), each guarded so bad data cannot fail the page."""
    out = []
    for build in (quantize_view, merge_search_view, bench_view, sweep_view, experts_view, upcycle_view):
        try:
            out += build(record, compare, users)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError) as e:
            out.append(Section(build.__name__.removesuffix("_view").replace("_", " "), "error", notes=[f"could not read this run's result files: {e!r}"]))
    return out


def quantize_view(record: RunRecord, compare: list[RunRecord], users: Any) -> list[Section]:
    report = run_json_file(record, "report.json")
    if record.command != "quantize" or not isinstance(report, dict):
        return []
    s = Section(f"quantisation: {report.get('scheme')}", "quantize")
    q = report.get("quality") or {}
    rows = []
    if q:
        rows += [["perplexity before", fmt_value(q.get("perplexity_before"))], ["perplexity after", fmt_value(q.get("perplexity_after"))],
                 ["increase", f"{fmt_value(q.get('perplexity_increase_pct'), 2)} %"], ["eval tokens", q.get("tokens")]]
    rows += [["bits per parameter, quantised layers", fmt_value(report.get("bits_per_param_quantized_layers"))],
             ["bits per parameter, whole model", fmt_value(report.get("bits_per_param_overall"))],
             ["size on disk", f"{_mb(report.get('size_bytes'))} (from {_mb(report.get('original_size_bytes'))}, x{fmt_value(report.get('size_ratio'))})"],
             ["layers quantised", report.get("layers_quantized")], ["quantise time", f"{fmt_value(report.get('quantize_seconds'))} s"]]
    if report.get("group_size_chosen"):
        rows.append(["group size", f"{report['group_size_chosen'].get('group_size')} ({report['group_size_chosen'].get('why')})"])
    s.tables.append(Table(["", ""], rows, "report.json"))
    if q and _is_num(q.get("perplexity_before")) and _is_num(q.get("perplexity_after")):
        s.charts.append(svg.chart([svg.Series("perplexity", [0, 1], [q["perplexity_before"], q["perplexity_after"]], markers=True)],
                                  "perplexity before (0) and after (1) quantisation", "", "perplexity", kind="quality", y_from_zero=True, width=360))
    layers = layer_settings(record)
    if layers:
        settings = sorted({v[0] for v in layers.values()})
        s.charts.append(svg.chart(
            [svg.Series(name, [i for i, v in enumerate(layers.values()) if v[0] == name], [v[1] for v in layers.values() if v[0] == name],
                        markers=True, line=False) for name in settings],
            "bits per parameter of each quantised layer (in model order)", "layer", "bits", kind="layers", y_from_zero=True))
        s.tables.append(Table(["layer", "setting", "bits"], [[n, v[0], v[1]] for n, v in layers.items()], "per-layer settings (the model's config.json)"))
    plan = report.get("plan")
    if isinstance(plan, dict):
        s.tables.append(Table(["setting", "layers"], [[k, v] for k, v in (plan.get("layers_per_setting") or {}).items()],
                              f"mixed-precision allocation: {fmt_value(plan.get('bits_per_param'))} bits/param, budget {_mb(plan.get('budget_bytes'))}"))
    worst = report.get("worst_layers") or []
    if worst:
        s.tables.append(Table(["layer", "setting", "relative error ||W - Q(W)|| / ||W||"],
                              [[w.get("name"), w.get("setting"), fmt_value(w.get("relative_error"))] for w in worst], "largest weight errors"))
    return [s]


def layer_settings(record: RunRecord) -> dict[str, tuple[str, float]]:
    """Each quantised layer's setting and bits, from the quantised model's config.json (compressed-tensors or mlc's own)."""
    art = (record.data.get("artifacts") or {}).get("model") or {}
    from pathlib import Path

    config = read_json_file(Path(str(art["path"])) / "config.json") if isinstance(art, dict) and art.get("path") else None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict):
        return {}
    out: dict[str, tuple[str, float]] = {}
    for group in (qc.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        bits = w.get("num_bits")
        label = f"{w.get('type', 'int')}{bits}" + (f"-g{w['group_size']}" if w.get("group_size") else "")
        for t in group.get("targets", []):
            if isinstance(t, str) and t.startswith("re:^") and t.endswith("$"):
                out[re.sub(r"\\(.)", r"\1", t[4:-1])] = (label, float(bits))
    for name, entry in (qc.get("layers") or {}).items():
        bits = entry.get("bits") or {"codebook": 4, "llm_int8": 8, "fp8": 8}.get(entry.get("kind"), 0)
        label = entry.get("kind", "?") + (f"{bits}" if entry.get("kind") == "int" else "") + (f"-g{entry['group_size']}" if entry.get("group_size") else "")
        out[name] = (label, float(bits))
    return dict(sorted(out.items(), key=lambda kv: _layer_order(kv[0])))


def _layer_order(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def merge_search_view(record: RunRecord, compare: list[RunRecord], users: Any) -> list[Section]:
    pareto = run_json_file(record, "artifacts/search/pareto.json")
    trials = run_json_file(record, "artifacts/search/trials.json")
    if not isinstance(pareto, dict) or not isinstance(trials, list):
        return []
    names = list(pareto.get("objectives") or [])
    s = Section("merge search: every evaluated merge and the Pareto front", "merge-search")
    front_ids = {t.get("trial") for t in pareto.get("front", [])}
    best = min(trials, key=lambda t: t.get("macro", math.inf)) if trials else None
    if len(names) >= 2:
        a, b = names[0], names[1]

        def xy(t: dict) -> tuple[Any, Any]:
            return t["values"].get(a), t["values"].get(b)

        front = sorted((t for t in trials if t.get("trial") in front_ids), key=lambda t: xy(t)[0])
        marks = [svg.Mark(*xy(t), t["kind"].removeprefix("pool:"), "#1f77b4", "square") for t in trials if t["kind"].startswith("pool:") or t["kind"] == "uniform"]
        if best:
            marks.append(svg.Mark(*xy(best), "best", "#2ca02c"))
        s.charts.append(svg.chart([svg.Series("trials", [xy(t)[0] for t in trials], [xy(t)[1] for t in trials], "#aaaaaa", markers=True, line=False),
                                   svg.Series("Pareto front", [xy(t)[0] for t in front], [xy(t)[1] for t in front], "#d62728", markers=True)],
                                  "merge search", a, b, kind="pareto", marks=marks))
    s.charts.append(svg.chart([svg.Series("macro loss", [t.get("trial") for t in trials], [t.get("macro") for t in trials], markers=True)],
                              "macro loss of each trial", "trial", "macro loss", kind="trials"))
    s.tables.append(Table(["trial", "kind", "weights", *names, "macro loss", "front"],
                          [[t.get("trial"), t.get("kind"), ", ".join(fmt_value(w, 3) for w in t.get("weights", [])),
                            *[fmt_value(t["values"].get(n)) for n in names], fmt_value(t.get("macro")), "●" if t.get("trial") in front_ids else ""]
                           for t in trials], "trials.json"))
    return [s]


CDF_METRICS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL"))


def bench_view(record: RunRecord, compare: list[RunRecord], users: Any) -> list[Section]:
    result = run_json_file(record, "artifacts/result/result.json")
    if not isinstance(result, dict):
        return []
    s = Section(f"bench: {result.get('model_id')} at {result.get('base_url')}{result.get('endpoint') or ''}", "bench")
    rows = [[k, fmt_value(result.get(k))] for k in ("completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
                                             "request_goodput", "max_concurrency") if result.get(k) is not None]
    for name, label in CDF_METRICS:
        for stat in ("mean", "median", "p99"):
            if _is_num(result.get(f"{stat}_{name}_ms")):
                rows.append([f"{stat} {label} (ms)", fmt_value(result[f"{stat}_{name}_ms"])])
    s.tables.append(Table(["metric", "value"], rows, "result.json"))
    runs = [(record, result)] + [(c, run_json_file(c, "artifacts/result/result.json")) for c in compare]
    detailed = [(r, res["per_request"]) for r, res in runs if isinstance(res, dict) and isinstance(res.get("per_request"), list)]
    if not detailed:
        s.notes.append("no per-request timings in this result: `mlc bench serve --save-detailed` records them (latency CDFs and the timeline).")
        return [s]
    for name, label in CDF_METRICS:
        series = []
        for r, reqs in detailed:
            values = sorted(v * 1000 for v in _latencies(reqs, name) if _is_num(v))
            if values:
                series.append(svg.Series(series_name(r, len(detailed)), values, [(i + 1) / len(values) for i in range(len(values))]))
        what = "of gaps between tokens" if name == "itl" else "of requests"
        s.charts.append(svg.chart(series, f"{label} CDF", f"{label} (ms)", f"fraction {what}", kind="cdf", step=True, y_range=(0.0, 1.02)))
    reqs = detailed[0][1]
    spans = [svg.Span(int(q.get("index", i)), float(q.get("start", 0.0)), float(q.get("queued") or 0.0), q.get("ttft"),
                      float(q["start"]) + float(q["e2el"]) if q.get("success") and _is_num(q.get("e2el")) else None, bool(q.get("success")),
                      f"request {q.get('index')}: " + (f"TTFT {_ms(q.get('ttft'))}, end-to-end {_ms(q.get('e2el'))}, {q.get('output_tokens')} tokens"
                                                        if q.get("success") else f"failed: {q.get('error')}"))
             for i, q in enumerate(reqs) if isinstance(q, dict) and _is_num(q.get("start"))]
    s.charts.append(svg.timeline(spans, f"{len(spans)} requests over time"))
    return [s]


def _latencies(reqs: list[dict[str, Any]], name: str) -> list[Any]:
    ok = [q for q in reqs if isinstance(q, dict) and q.get("success")]
    if name == "itl":
        return [g for q in ok for g in (q.get("itl") or [])]
    if name == "tpot":
        return [q.get("tpot") for q in ok if (q.get("output_tokens") or 0) > 1]
    return [q.get(name) for q in ok]


def sweep_view(record: RunRecord, compare: list[RunRecord], users: Any) -> list[Section]:
    sweep = run_json_file(record, "artifacts/sweep/sweep.json")
    if not isinstance(sweep, dict):
        return []
    pct = sweep.get("slo_percentile", 99)
    s = Section("bench sweep: tokens/s per user against aggregate tokens/s", "sweep")
    points = [p for p in sweep.get("points", []) if isinstance(p, dict)]
    ok = [p for p in points if isinstance(p.get("result"), dict)]
    front = sorted((p for p in ok if p.get("label") in set(sweep.get("pareto", []))), key=lambda p: p.get("tokens_per_user") or 0)
    chosen = sweep.get("chosen")
    marks = [svg.Mark(chosen["tokens_per_user"], chosen["result"]["output_throughput"], f"chosen: {chosen['label']}")] if chosen else []
    s.charts.append(svg.chart(
        [svg.Series("points", [p["tokens_per_user"] for p in ok], [p["result"]["output_throughput"] for p in ok], "#aaaaaa", markers=True, line=False),
         svg.Series("Pareto front", [p["tokens_per_user"] for p in front], [p["result"]["output_throughput"] for p in front], "#d62728", markers=True)],
        "sweep", "output tokens/s per user", "output tokens/s (all users)", kind="sweep", marks=marks))
    s.tables.append(Table(
        ["point", f"p{pct:g} TTFT (ms)", f"p{pct:g} TPOT (ms)", "output tok/s", "tok/s per user", "goodput (req/s)", "front", "error"],
        [[p.get("label"), fmt_value((p.get("result") or {}).get(f"p{pct:g}_ttft_ms")), fmt_value((p.get("result") or {}).get(f"p{pct:g}_tpot_ms")),
          fmt_value((p.get("result") or {}).get("output_throughput")), fmt_value(p.get("tokens_per_user")), fmt_value((p.get("result") or {}).get("request_goodput")),
          "●" if p in front else "", p.get("error") or ""] for p in points], "sweep.json"))
    if chosen:
        s.notes.append(f"chosen within the SLOs {sweep.get('slos')}: {chosen['label']}; reproduce it with: {chosen.get('command')}")
    return [s]


def experts_view(record: RunRecord, compare: list[RunRecord], users: Any) -> list[Section]:
    rows = [r for r in metrics(record) if isinstance(r.get("moe/expert_share"), list) and _is_num(r.get("step"))]
    if not rows:
        return []
    layers = max(len(r["moe/expert_share"]) for r in rows)
    s = Section(f"expert utilisation over steps ({record.command} {record.id.rsplit('-', 1)[-1]})", "experts")
    steps = [r["step"] for r in rows]
    for layer in range(layers):
        experts = max(len(r["moe/expert_share"][layer]) for r in rows if layer < len(r["moe/expert_share"]))
        series = [svg.Series(f"expert {e}", steps, [_at(r["moe/expert_share"], layer, e) for r in rows]) for e in range(experts)]
        s.charts.append(svg.chart(series, f"layer {layer}: share of routing slots", "step", "share", kind="experts", y_from_zero=True,
                                  width=360, height=220))
    last = rows[-1].get("moe/max_min_ratio")
    if isinstance(last, list):
        s.tables.append(Table(["layer", "max/min expert share at the last step"], [[i, "an expert got no slot" if v is None else fmt_value(v)] for i, v in enumerate(last)]))
    return [s]


def upcycle_view(record: RunRecord, compare: list[RunRecord], users: Callable[[RunRecord], list[RunRecord]]) -> list[Section]:
    """An upcycled model's expert utilisation is measured by the runs that trained it: show theirs here."""
    if record.command != "upcycle":
        return []
    return [sec for u in users(record) for sec in experts_view(u, [], users)]


def _at(share: list, layer: int, expert: int) -> Any:
    try:
        return share[layer][expert]
    except (IndexError, TypeError):
        return None


def fmt_value(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return svg.fmt(round(v, digits)) if math.isfinite(v) else str(v)
    return str(v)


def _mb(v: Any) -> str:
    return f"{v / 1e6:,.1f} MB" if _is_num(v) else "?"


def _ms(v: Any) -> str:
    return f"{v * 1000:.1f} ms" if _is_num(v) else "?"
