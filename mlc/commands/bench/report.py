"""How a bench result looks to people: one rich table in the order vLLM prints its metrics."""

from __future__ import annotations

from typing import Any

NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL", "client_queue_time": "client queue"}


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def result_table(result: dict[str, Any]) -> Any:  # -> rich.table.Table
    from rich.table import Table

    title = f"mlc bench serve: {result['model_id']} at {result['base_url']}{result['endpoint']}"
    table = Table("metric", "value", title=title, title_justify="left", show_header=False)
    rows: list[tuple[str, Any]] = [
        ("Successful requests", result["completed"]),
        ("Failed requests", result["failed"]),
    ]
    if result.get("max_concurrency") is not None:
        rows.append(("Maximum request concurrency", result["max_concurrency"]))
    if result.get("request_rate") != "inf":
        rows.append(("Request rate configured (req/s)", result["request_rate"]))
    rows += [
        ("Benchmark duration (s)", result["duration"]),
        ("Total input tokens", result["total_input_tokens"]),
        ("Total generated tokens", result["total_output_tokens"]),
        ("Request throughput (req/s)", result["request_throughput"]),
    ]
    if result.get("request_goodput") is not None:
        slos = " ".join(f"{k}<={v:g}ms" for k, v in result["goodput_slos"].items())
        rows.append((f"Request goodput (req/s; {slos})", result["request_goodput"]))
    rows += [
        ("Output token throughput (tok/s)", result["output_throughput"]),
        ("Peak output token throughput (tok/s)", result["max_output_tokens_per_s"]),
        ("Peak concurrent requests", result["max_concurrent_requests"]),
        ("Total token throughput (tok/s)", result["total_token_throughput"]),
    ]
    cold = result.get("cold_start")
    if cold:
        rows += [("Cold start: process to healthy (s)", cold["healthy_s"]), ("Cold start: process to first token (s)", cold["first_token_s"])]
    for key, value in rows:
        table.add_row(key, _fmt(value))
    for name, label in NAMES.items():
        if f"mean_{name}_ms" not in result:
            continue
        table.add_section()
        table.add_row(f"Mean {label} (ms)", _fmt(result[f"mean_{name}_ms"]))
        table.add_row(f"Median {label} (ms)", _fmt(result[f"median_{name}_ms"]))
        table.add_row(f"Std {label} (ms)", _fmt(result[f"std_{name}_ms"]))
        for key in result:
            if key.startswith("p") and key.endswith(f"_{name}_ms") and key[1:].split("_")[0].replace(".", "").isdigit():
                table.add_row(f"P{key[1:].split('_')[0]} {label} (ms)", _fmt(result[key]))
    if result.get("errors"):
        table.add_section()
        for e in result["errors"]:
            table.add_row("[red]error[/red]", e)
    return table


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:,.2f} {prefix}{unit}"
    return f"{value:,.2f} {unit}"


def roofline_tables(r: dict[str, Any]) -> list[Any]:  # -> list[rich.table.Table]
    from rich.table import Table

    s, hw = r["shape"], r["hardware"]
    moe = f", {s['experts']} experts top-{s['top_k']}" if s["experts"] else ""
    head = Table(show_header=False, title=f"roofline: {r['model']}", title_justify="left")
    head.add_row("model", f"{_si(r['params'], 'params')} ({_si(r['active_params_per_token'], 'active')}), {s['layers']} layers, hidden {s['hidden']}, "
                 f"{s['heads']} heads / {s['kv_heads']} KV x {s['head_dim']}, vocab {s['vocab']}{', tied head' if s['tied'] else ''}{moe}")
    head.add_row("hardware", f"{hw['name']}: {_si(hw['mem_bw_bytes_s'], 'B/s')}, {_si(hw['flops'], 'FLOP/s')}, "
                 f"ridge {hw['ridge_flop_per_byte']:,.0f} FLOP/byte ({hw['source']})")
    if hw.get("mem_bw_bytes_per_cpu_s"):
        head.add_row("per busy core", f"{_si(hw['mem_bw_bytes_per_cpu_s'], 'B')} and {_si(hw['flops_per_cpu_s'], 'FLOP')} per CPU-second of the measurement")
    head.add_row("KV cache", f"{r['kv_bytes_per_token']:,} bytes/token ({r['weights']} weights)")
    head.add_row("decode FLOPs", f"{_si(r['decode_flops_per_token'], 'FLOP')}/token at {r['context']} tokens of context")
    head.add_row("prefill", f"{_si(r['prefill_flops'], 'FLOP')} for a {r['prefill_len']}-token prompt: >= {r['prefill_s_min'] * 1000:,.1f} ms")
    if "kv_budget_bytes" in r:
        head.add_row("KV budget", f"{_si(r['kv_budget_bytes'], 'B')}: {r['kv_budget_tokens']:,} tokens = {r['kv_budget_concurrency']:,} "
                     f"concurrent sequences of {r['context']} tokens")
    tables = [head]
    schemes = Table("weights", "bytes read per step", f"batch-1 decode <= tok/s (context {r['context']})", "compute-bound from batch",
                    title="per weight format", title_justify="left")
    for row in r["schemes"]:
        mark = " *" if row["weights"] == r["weights"] else ""
        cb = f"{row['compute_bound_batch']:,}" if row["compute_bound_batch"] else "never (KV reads grow as fast)"
        schemes.add_row(row["weights"] + mark, _si(row["bytes_per_step_batch1"], "B"), f"{row['decode_tok_s_batch1']:,.1f}", cb)
    tables.append(schemes)
    batches = Table("batch", "decode <= tok/s", "per stream", "limited by", title=f"{r['weights']} weights, context {r['context']}", title_justify="left")
    for b in r["batches"]:
        batches.add_row(str(b["batch"]), f"{b['decode_tok_s']:,.1f}", f"{b['decode_tok_s'] / b['batch']:,.1f}", b["limited_by"])
    tables.append(batches)
    if "result" in r:
        x = r["result"]
        res = Table("", "measured", "bound", "fraction", title=f"the result at batch {x['batch']}, mean context {x['context']}", title_justify="left")
        if x["per_stream_tok_s"]:
            res.add_row("decode tok/s per stream (1000 / median TPOT)", f"{x['per_stream_tok_s']:,.1f}", f"{x['bound_per_stream_tok_s']:,.1f}", f"{x['per_stream_fraction']:.1%}")
        res.add_row("output tok/s (prefill included)", f"{x['output_tok_s']:,.1f}", f"{x['bound_tok_s']:,.1f}", f"{x['output_fraction']:.1%}")
        if "per_server_cpu_s_tok" in x:
            res.add_row("output tokens per server CPU-second", f"{x['per_server_cpu_s_tok']:,.1f}", f"{x['bound_per_cpu_s_tok']:,.1f}",
                        f"{x['per_server_cpu_s_fraction']:.1%}")
        tables.append(res)
    return tables
