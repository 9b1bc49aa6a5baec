"""Benchmark any OpenAI-compatible server (vLLM's metrics), sweep its settings, bound it by a roofline, compare runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from mlc.cliutil import new_app

app = new_app("Benchmark any OpenAI-compatible server (vLLM's metrics), sweep its settings, bound it by a roofline, compare runs.")
JSON = typer.Option(False, "--json", help="Machine-readable JSON on stdout.")


@app.callback()
def bench() -> None:
    """Benchmark any OpenAI-compatible server (vLLM's metrics), sweep its settings, bound it by a roofline, compare runs."""


@app.command("serve")
def serve(
    base_url: Optional[str] = typer.Option(None, "--base-url", help="The server, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine). Default: http://127.0.0.1:8000."),
    endpoint: str = typer.Option("completions", "--endpoint", help="completions (/v1/completions) or chat (/v1/chat/completions)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", help="Sent as 'Authorization: Bearer KEY'."),
    model: Optional[str] = typer.Option(None, "--model", help="The model name to send (default: the first one at /v1/models)."),
    server: Optional[str] = typer.Option(
        None, "--server", help="A command that starts the server, e.g. \"mlc serve MODEL --port {port}\" ({port}: a free port, and the URL); "
        "bench waits for health, measures, stops it, and records cold start.",
    ),
    server_timeout: float = typer.Option(600.0, "--server-timeout", help="Seconds to wait for --server to become healthy."),
    model_ref: Optional[str] = typer.Option(None, "--model-ref", help="The mlc artifact the server serves (path or run:<id>): recorded as this run's input for lineage."),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", help="Model directory or tokenizer.json: makes random prompts, and counts tokens when the server sends no usage "
        "(default: the served mlc model's, with --server or --model-ref).",
    ),
    dataset: str = typer.Option("random", "--dataset", help="random, chat (mlc's bundled corpus), sharegpt, jsonl or prefix-repetition."),
    dataset_path: Optional[Path] = typer.Option(None, "--dataset-path", help="The file for sharegpt (JSON) or jsonl ({\"prompt\": ...} a line)."),
    input_len: int = typer.Option(1024, "--input-len", help="random: prompt tokens (special tokens the server adds included)."),
    output_len: Optional[int] = typer.Option(None, "--output-len", help="Tokens to ask for (default: 128 for random and prefix-repetition, the reference answer's for chat/sharegpt, 256 for jsonl)."),
    range_ratio: float = typer.Option(0.0, "--range-ratio", help="random: lengths drawn uniformly from [L(1-r), L(1+r)]."),
    prefix_len: int = typer.Option(256, "--prefix-len", help="prefix-repetition: tokens of each shared prefix."),
    suffix_len: int = typer.Option(256, "--suffix-len", help="prefix-repetition: tokens after the prefix, different per prompt."),
    num_prefixes: int = typer.Option(10, "--num-prefixes", help="prefix-repetition: how many different prefixes."),
    shuffle: bool = typer.Option(True, "--shuffle/--no-shuffle", help="sharegpt, jsonl, chat: shuffle the prompts with --seed (as vLLM), or keep the file's order."),
    num_prompts: int = typer.Option(1000, "--num-prompts", "-n", help="Requests to send (vLLM's default: 1000)."),
    request_rate: float = typer.Option(float("inf"), "--request-rate", help="Requests per second; inf sends all at once."),
    burstiness: float = typer.Option(1.0, "--burstiness", help="Gamma shape of the arrival gaps: 1 = Poisson, <1 burstier, >1 more regular, inf = constant."),
    max_concurrency: Optional[int] = typer.Option(None, "--max-concurrency", help="At most this many requests in flight (the rest wait in the client)."),
    ramp_up: Optional[str] = typer.Option(None, "--ramp-up", help="linear or exponential: the rate goes from --ramp-up-start-rps to --ramp-up-end-rps over the run."),
    ramp_up_start_rps: Optional[float] = typer.Option(None, "--ramp-up-start-rps", help="Ramp-up: the first request's rate."),
    ramp_up_end_rps: Optional[float] = typer.Option(None, "--ramp-up-end-rps", help="Ramp-up: the last request's rate."),
    num_warmups: int = typer.Option(0, "--num-warmups", min=0, help="Requests sent (and not counted) before the measurement."),
    seed: int = typer.Option(0, "--seed", help="Seeds the prompts and the arrival times."),
    request_timeout: float = typer.Option(21600.0, "--request-timeout", help="Seconds before one request counts as failed."),
    percentiles: str = typer.Option("99", "--percentiles", help="Comma-separated percentiles of TTFT, TPOT, ITL and E2EL to report, e.g. 50,90,99."),
    goodput: Optional[List[str]] = typer.Option(
        None, "--goodput", help="SLOs for goodput in ms: 'ttft:500 tpot:50 e2el:2000' (quoted, or one --goodput per SLO)."
    ),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sent with every request (default: the server's)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Sent with every request (default: the server's)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sent with every request (default: the server's)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Ask the server to generate all tokens past EOS (always on for random prompts, as in vLLM)."),
    extra_body: Optional[str] = typer.Option(None, "--extra-body", help="A JSON object merged into every request body."),
    label: Optional[str] = typer.Option(None, "--label", help="A name for this result (kept in the result file)."),
    save_result: Optional[Path] = typer.Option(None, "--save-result", help="Write the result JSON (every metric, the settings, versions) here."),
    save_detailed: bool = typer.Option(False, "--save-detailed", help="Include every request's timings in the saved result."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write PNG figures into this directory (needs matplotlib: the bench extra)."),
    json_output: bool = JSON,
) -> None:
    """Measure an OpenAI-compatible server as `vllm bench serve` does: TTFT, TPOT, ITL, E2EL, throughput, goodput.

    Definitions follow vLLM's (mlc/commands/bench/README.md lists the few differences). The result is
    recorded in a run directory (`mlc runs show latest:bench`), with lineage to the served mlc model
    when it is known (--server "mlc serve ..." or --model-ref).
    """
    import json

    from mlc import console, options
    from mlc.commands.bench.datasets import DatasetOptions
    from mlc.commands.bench.metrics import parse_goodput, parse_percentiles
    from mlc.commands.bench.report import result_table
    from mlc.commands.bench.runner import Load
    from mlc.commands.bench.serve import ServeBench, run_serve_bench, save_outputs
    from mlc.errors import MlcUsageError
    from mlc.runs import open_run

    try:
        extra = json.loads(extra_body) if extra_body else {}
    except json.JSONDecodeError as e:
        raise MlcUsageError(f"--extra-body is not JSON ({e.msg})", "give a JSON object, e.g. '{\"min_p\": 0.1}'") from None
    if not isinstance(extra, dict):
        raise MlcUsageError("--extra-body is not a JSON object", "give a JSON object, e.g. '{\"min_p\": 0.1}'")
    opts = ServeBench(
        base_url=base_url, endpoint=endpoint, api_key=api_key, model=model, server=server, server_timeout=server_timeout,
        model_ref=model_ref, tokenizer=tokenizer,
        dataset=DatasetOptions(dataset, dataset_path, input_len, output_len, range_ratio, prefix_len, suffix_len, num_prefixes, seed, shuffle),
        num_prompts=num_prompts,
        load=Load(request_rate, burstiness, max_concurrency, ramp_up, ramp_up_start_rps, ramp_up_end_rps, num_warmups, seed, request_timeout),
        percentiles=parse_percentiles(percentiles), slos=parse_goodput(goodput or []),
        temperature=temperature, top_p=top_p, top_k=top_k, ignore_eos=ignore_eos, extra_body=extra, label=label,
    )
    opts.validate()
    with open_run("bench", {"subcommand": "serve", **opts.settings()}) as run:
        result = run_serve_bench(opts, run)
        save_outputs(result, run, save_result, save_detailed, plot)
    if options.want_json(json_output):
        console.print_json(result)
        return
    console.out.print(result_table(result))
    console.info(f"run {run.id}" + (f"; result in {save_result}" if save_result else ""))


@app.command("sweep")
def sweep(
    server_template: str = typer.Option(
        ..., "--server-template", help="The server command with placeholders: \"mlc serve {model} --port {port} --max-running {max_running} {compile?--compile}\"."
    ),
    grid: Optional[List[str]] = typer.Option(None, "--grid", help="NAME=V1,V2,...: server settings to try (repeatable; every combination runs)."),
    var: Optional[List[str]] = typer.Option(None, "--var", help="NAME=VALUE: a fixed template value, e.g. model=path/to/model (repeatable)."),
    load: Optional[List[str]] = typer.Option(None, "--load", help="NAME=V1,V2,...: loads per server: concurrency, rate, num_prompts, input_len, output_len, burstiness."),
    slo: Optional[List[str]] = typer.Option(None, "--slo", help="ttft:MS, tpot:MS or e2el:MS (repeatable): pick the best point that meets them all."),
    slo_percentile: float = typer.Option(99.0, "--slo-percentile", help="A point meets an SLO when this percentile of the metric is within it."),
    server_timeout: float = typer.Option(600.0, "--server-timeout", help="Seconds to wait for each server to become healthy."),
    endpoint: str = typer.Option("completions", "--endpoint", help="completions or chat."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", help="Sent as 'Authorization: Bearer KEY'."),
    model: Optional[str] = typer.Option(None, "--model", help="The model name to send (default: the server's first)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="As for `bench serve` (default: the served mlc model's)."),
    dataset: str = typer.Option("random", "--dataset", help="random, chat, sharegpt, jsonl or prefix-repetition."),
    dataset_path: Optional[Path] = typer.Option(None, "--dataset-path", help="The file for sharegpt or jsonl."),
    input_len: int = typer.Option(1024, "--input-len", help="random: prompt tokens."),
    output_len: Optional[int] = typer.Option(None, "--output-len", help="Tokens to ask for (each dataset's default otherwise)."),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts", "-n", help="Requests per point (default: 4 x its concurrency, at least 16; 64 without one)."),
    request_rate: float = typer.Option(float("inf"), "--request-rate", help="Requests per second at points without a rate."),
    num_warmups: int = typer.Option(0, "--num-warmups", min=0, help="Uncounted requests before each point."),
    seed: int = typer.Option(0, "--seed", help="Seeds prompts and arrivals."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sent with every request (default: the server's)."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Generate all tokens past EOS (always on for random prompts)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the Pareto plot (pareto.png) into this directory (needs matplotlib)."),
    save_result: Optional[Path] = typer.Option(None, "--save-result", help="Write every point's result, the front and the pick as JSON here."),
    json_output: bool = JSON,
) -> None:
    """Run a grid of server settings under a grid of loads: one table, a Pareto plot, and the best setting that meets the SLOs."""
    import json

    from mlc import console, options
    from mlc.commands.bench import sweep as sw
    from mlc.commands.bench.datasets import DatasetOptions
    from mlc.commands.bench.metrics import parse_goodput
    from mlc.commands.bench.runner import Load
    from mlc.commands.bench.serve import ServeBench
    from mlc.errors import MlcError, MlcUsageError
    from mlc.io.atomic import atomic_write_json
    from mlc.runs import open_run

    slos = parse_goodput(slo or [])
    if not 0 < slo_percentile <= 100:
        raise MlcUsageError(f"--slo-percentile {slo_percentile} is outside (0, 100]", "e.g. 99 or 50")
    fixed = {k: v[0] for k, v in sw.parse_pairs(var or [], "--var", multi=False).items()}
    the_plan = sw.plan(server_template, sw.parse_pairs(grid or [], "--grid", multi=True), fixed, sw.parse_pairs(load or [], "--load", multi=True))
    percentiles = sorted({50.0, 90.0, 99.0, slo_percentile})
    base = ServeBench(
        endpoint=endpoint, api_key=api_key, model=model, server=server_template, server_timeout=server_timeout, tokenizer=tokenizer,
        dataset=DatasetOptions(dataset, dataset_path, input_len, output_len, seed=seed), num_prompts=num_prompts or 1,
        load=Load(request_rate=request_rate, num_warmups=num_warmups, seed=seed), percentiles=percentiles, slos=slos,
        temperature=temperature, ignore_eos=ignore_eos,
    )
    base.validate()
    config = {"server_template": server_template, "grid": grid, "var": var, "load": load, "slo": slos, "slo_percentile": slo_percentile,
              "bench": base.settings()}
    with open_run("bench-sweep", config) as run:
        points = sw.run_sweep(base, server_template, the_plan, slo_percentile, num_prompts, run)
        if not any(p["result"] for p in points):
            raise MlcError(f"every point of the sweep failed; the first: {points[0]['error']}", f"server logs are in {run.path}")
        chosen = sw.choose(points, slos, slo_percentile) if slos else None
        out = sw.summary(points, chosen, sw.bench_args(base), slos, slo_percentile)
        with run.artifact("sweep", kind="bench-sweep") as staging:
            (staging / "sweep.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
            if plot is not None:
                sw.plot_pareto(points, chosen, staging / "pareto.png")
        if plot is not None:
            plot.mkdir(parents=True, exist_ok=True)
            (plot / "pareto.png").write_bytes((run.path / "artifacts" / "sweep" / "pareto.png").read_bytes())
        run.set_summary(points=len(points), failed=sum(p["result"] is None for p in points), chosen=out["chosen"]["label"] if out["chosen"] else None)
    if save_result is not None:
        atomic_write_json(save_result, out)
    if options.want_json(json_output):
        console.print_json({"run": run.id, **out})
        return
    _print_wide(sw.table(points, slos, slo_percentile, chosen))
    if slos and chosen is None:
        console.out.print(f"No point meets every SLO at p{slo_percentile:g} ({', '.join(f'{k} <= {v:g} ms' for k, v in slos.items())}).")
    elif chosen is not None:
        r = chosen["result"]
        console.out.print(f"Chosen: {chosen['label']} ({r['request_goodput']:.2f} good req/s, {r['output_throughput']:.1f} output tok/s, "
                          f"p{slo_percentile:g} TTFT {r[f'p{slo_percentile:g}_ttft_ms']:.0f} ms, TPOT {r[f'p{slo_percentile:g}_tpot_ms']:.1f} ms). Reproduce it with:")
        console.out.print(out["chosen"]["command"], markup=False, highlight=False)
    console.info(f"run {run.id}")


@app.command("compare")
def compare(
    a: Path = typer.Argument(..., help="The baseline result (mlc or vLLM `bench serve --save-result`)."),
    b: Path = typer.Argument(..., help="The new result."),
    fail_on: Optional[List[str]] = typer.Option(
        None, "--fail-on", help="Exit 1 when a change passes a limit: 'tpot_p99>+5%', 'output_throughput<-10%', 'failed>0' (repeatable)."
    ),
    json_output: bool = JSON,
) -> None:
    """Show two results side by side with their changes; --fail-on makes a regression exit non-zero (for CI)."""
    from mlc import console, options
    from mlc.commands.bench import compare as cmp
    from mlc.errors import MlcError

    checks = [cmp.parse_check(spec) for spec in fail_on or []]
    report = cmp.compare(cmp.load_result(a), cmp.load_result(b), checks)
    if options.want_json(json_output):
        console.print_json({"a": str(a), "b": str(b), **report})
    else:
        console.out.print(cmp.table(report, a.name, b.name))
        for v in report["checks"]:
            mark = "[red]FAIL[/red]" if v["failed"] else "[green]ok[/green]"
            console.out.print(f"{mark} {v['check']}: {v['metric']} changed {v['change']:+.2f}{v['unit']}")
    failed = [v for v in report["checks"] if v["failed"]]
    if failed:
        raise MlcError("regression: " + "; ".join(f"{v['metric']} {v['change']:+.2f}{v['unit']} ({v['check']})" for v in failed), "see the table above")



def _print_wide(renderable: Any) -> None:
    """Into a pipe or a log file at up to 160 columns: at rich's 80 there, the sweep's point labels were cut to "max_ru…"."""
    from mlc import console

    if console.out.is_terminal:
        console.out.print(renderable)
        return
    saved = console.out.width
    console.out.width = max(saved, 160)
    try:
        console.out.print(renderable)
    finally:
        console.out.width = saved


@app.command("roofline")
def roofline(
    model: str = typer.Argument(..., help="A model directory (config.json; safetensors for 'stored') or run reference."),
    hardware: Optional[str] = typer.Option(None, "--hardware", help="cpu:auto (measure this machine, a few seconds), h100-sxm, h100-pcie, h200, a100-80gb, a100-40gb, l4."),
    mem_bw: Optional[str] = typer.Option(None, "--mem-bw", help="Memory bandwidth, e.g. 3.35TB/s (overrides --hardware's)."),
    flops: Optional[str] = typer.Option(None, "--flops", help="Matmul FLOP/s in the compute dtype, e.g. 989T (overrides --hardware's)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="The format the bound uses: stored (the directory's tensors), fp32, bf16, int8, fp8, int4-g128, int4-g32, nf4-g64 (default: stored)."),
    context: int = typer.Option(512, "--context", min=0, help="Tokens of context each decoding sequence reads (with --result: the result's mean)."),
    prompt_len: int = typer.Option(256, "--prompt-len", min=1, help="Prompt length for the prefill figures."),
    batch: str = typer.Option("1,8,32,64", "--batch", help="Batch sizes to bound, comma-separated."),
    kv_budget: Optional[str] = typer.Option(None, "--kv-budget", help="KV cache memory (e.g. 2GiB): how many sequences of --context tokens fit."),
    result: Optional[Path] = typer.Option(None, "--result", help="A `bench serve --save-result` file: what fraction of the bound it reached."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="cpu:auto: measure with this many threads (default: all cores, as mlc serve uses)."),
    json_output: bool = JSON,
) -> None:
    """Bound a model's serving speed on given hardware: bytes and FLOPs per token against bandwidth and FLOP/s."""
    from mlc import console, options
    from mlc.commands.bench import roofline as rl
    from mlc.commands.bench.compare import load_result
    from mlc.commands.bench.hardware import parse_rate, resolve_hardware
    from mlc.commands.bench.report import roofline_tables
    from mlc.errors import MlcUsageError
    from mlc.io.hfdir import read_config
    from mlc.runs.refs import resolve

    if weights is not None and weights not in ("stored", *rl.SCHEMES):
        raise MlcUsageError(f"unknown --weights {weights!r}", "one of stored, " + ", ".join(rl.SCHEMES))
    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise MlcUsageError(f"bad --batch {batch!r}", "comma-separated positive integers, e.g. 1,8,32")
    budget = int(parse_rate(kv_budget, "kv-budget")) if kv_budget else None
    model_dir = resolve(model, options.get().runs_dir.absolute()).path
    if not (model_dir / "config.json").is_file():
        raise MlcUsageError(f"{model} has no config.json", "give a model directory or a run reference to one")
    res = load_result(result) if result else None
    # The dtype the server computes in: fp32 for fp32 weights (stored ones too), else bf16, as mlc serve does.
    compute_dtype = "float32" if rl.kv_dtype_bytes(read_config(model_dir), weights or "stored") == 4 else "bfloat16"
    if hardware == "cpu:auto":
        console.info("measuring this machine's memory bandwidth and matmul FLOP/s (a few seconds)")
    hw = resolve_hardware(hardware, mem_bw, flops, compute_dtype, threads)
    rep = rl.report(model_dir, hw, weights, context, prompt_len, batches, budget, res)
    if options.want_json(json_output):
        console.print_json(rep)
        return
    for t in roofline_tables(rep):
        console.out.print(t)
