"""Convert, inspect, verify, diff and average checkpoints (dcp, hf, torch, gguf, universal, tensor-parallel shards)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mlc.cliutil import new_app, parse_shard_size

app = new_app("Convert, inspect, verify, diff and average checkpoints (dcp, hf, torch, gguf, universal, tensor-parallel shards).")

SRC_HELP = "A checkpoint: a path, run:<id> (a train run's latest step), run:<id>@step-N, run:<id>/<artifact>, latest:<command>."


@app.callback()
def checkpoint() -> None:
    """Checkpoint tools: convert between formats, inspect, verify, diff and average."""


@app.command()
def convert(
    src: str = typer.Argument(..., help=SRC_HELP),
    to: str = typer.Option(..., "--to", help="Target format: hf, dcp, torch, universal, tp, gguf (mlc plugins lists them)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written whole or not at all)."),
    source_format: Optional[str] = typer.Option(None, "--from", help="Source format name (default: detected)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Weight dtype: float32, bfloat16, float16 (default: as stored)."),
    with_optimizer: bool = typer.Option(False, "--with-optimizer", help="Keep optimizer state (dcp, universal, tp; default: model only)."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="hf: largest safetensors shard, e.g. 2GB (default 5GiB)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="gguf: F32, F16, BF16, Q8_0, Q4_0 or Q4_K_M (llama.cpp's k-quant mix) (default: F16)."),
    spec: Optional[str] = typer.Option(None, "--spec", help="tp: the shard spec, a shipped name (megatron-llama, megatron-gpt) or a TOML file."),
    tp: Optional[int] = typer.Option(None, "--tp", help="tp: how many tensor-parallel shards to write."),
    config: Optional[Path] = typer.Option(None, "--config", help="config.json (or its HF directory) for sources that carry none (torch, tp)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
) -> None:
    """Convert SRC to --to FORMAT, streaming one tensor at a time, and record a run with lineage."""
    from mlc import console, options
    from mlc.commands.checkpoint.convert import check_options
    from mlc.commands.checkpoint.convert import convert as run_convert
    from mlc.io.formats import ConvertOptions
    from mlc.models.config import dtype_name, parse_dtype

    shard_bytes = parse_shard_size(max_shard_size) if max_shard_size else None
    check_options(to, {"max_shard_bytes": shard_bytes, "quant": quant, "tp": tp})
    opts = ConvertOptions(
        dtype=dtype_name(parse_dtype(dtype)) if dtype else None, with_optimizer=with_optimizer, quant=quant, spec=spec, tp=tp,
        config=str(config) if config else None,
    )
    if shard_bytes:
        opts.max_shard_bytes = shard_bytes
    result = run_convert(src, to, out, source_format, opts, overwrite)
    if options.want_json(json_output):
        console.print_json(result)
    else:
        console.out.print(f"wrote {result['out']} ({result['from']} -> {result['to']}, {result['seconds']} s)")


def _path(src: str) -> Path:
    from mlc import options
    from mlc.commands.checkpoint.sources import resolve_source

    return resolve_source(src, options.get().runs_dir)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)


@app.command()
def inspect(
    src: str = typer.Argument(..., help=SRC_HELP),
    source_format: Optional[str] = typer.Option(None, "--from", help="Source format name (default: detected)."),
    tensors: bool = typer.Option(False, "--tensors", help="Also show every tensor as a tree (name, dtype, shape)."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
) -> None:
    """Show format, step, world size, dtypes, parameter count, bytes and whether optimizer state is present."""
    from mlc import console, options
    from mlc.commands.checkpoint.inspect import inspect as run_inspect
    from mlc.commands.checkpoint.inspect import tensor_tree

    result = run_inspect(_path(src), source_format, tensors)
    if options.want_json(json_output):
        console.print_json(result)
        return
    out = console.out
    out.print(f"[bold]{result['path']}[/bold]  ({result['format']})")
    for key in ("architecture", "step", "world_size"):
        if result.get(key) is not None:
            out.print(f"  {key.replace('_', ' '):<16}{result[key]}")
    out.print(f"  {'parameters':<16}{result['parameters']:,} in {result['tensors']} tensors ({_size(result['weight_bytes'])})")
    for dtype, d in sorted(result["dtypes"].items(), key=lambda kv: -kv[1]["bytes"]):
        out.print(f"    {dtype:<14}{d['params']:,} parameters, {d['tensors']} tensors, {_size(d['bytes'])}")
    optim = f"yes ({_size(result['optimizer_bytes'])})" if result["optimizer_state"] else "no"
    out.print(f"  {'optimizer state':<16}{optim}")
    out.print(f"  {'total':<16}{_size(result['total_bytes'])}")
    if tensors:
        out.print(tensor_tree(result["tensor_list"]))


@app.command()
def verify(
    src: str = typer.Argument(..., help=SRC_HELP),
    source_format: Optional[str] = typer.Option(None, "--from", help="Source format name (default: detected)."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
) -> None:
    """Check the COMPLETE marker, the recorded hashes (or DCP's CRCs) and that every tensor reads and is finite; exit 0 or 1."""
    from mlc import console, options
    from mlc.commands.checkpoint.verify import verify as run_verify

    result = run_verify(_path(src), source_format)
    if options.want_json(json_output):
        console.print_json(result)
    else:
        for problem in result["problems"]:
            console.out.print(f"[red]bad[/red] {problem}", highlight=False, soft_wrap=True)
        if result["ok"]:
            console.out.print(f"ok {result['path']} ({result['format']}, {result['tensors']} tensors; checked {', '.join(result['checked'])})", highlight=False, soft_wrap=True)
    if not result["ok"]:
        raise typer.Exit(1)


@app.command()
def diff(
    a: str = typer.Argument(..., help="The first checkpoint (" + SRC_HELP[2:]),
    b: str = typer.Argument(..., help="The second checkpoint."),
    top: int = typer.Option(10, "--top", help="How many tensors and layers to list, largest change first."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout (every tensor)."),
) -> None:
    """Per-tensor max abs and relative difference and cosine similarity, and which layers moved most."""
    from mlc import console, options
    from mlc.commands.checkpoint.diff import diff as run_diff

    result = run_diff(_path(a), _path(b), None, None)
    if options.want_json(json_output):
        console.print_json(result)
        return
    from rich.table import Table

    table = Table("tensor", "max |a-b|", "||a-b||/||a||", "cosine", title=f"{len(result['tensors'])} tensors compared, largest relative change first")
    for r in sorted(result["tensors"], key=lambda r: -r["relative"])[:top]:
        table.add_row(r["name"], f"{r['max_abs']:.3g}", f"{r['relative']:.3g}", f"{r['cosine']:.6f}")
    console.out.print(table)
    layers = ", ".join(f"{d['layer']} ({d['mean_relative']:.3g})" for d in result["layers"][:top])
    console.out.print(f"layers that moved most (mean relative change): {layers}")
    for key, label in (("only_in_a", "only in A"), ("only_in_b", "only in B")):
        if result[key]:
            console.out.print(f"{label}: {len(result[key])} tensors (first: {result[key][0]})")
    for m in result["shape_mismatch"][:top]:
        console.out.print(f"shape differs: {m['name']} {m['a']} vs {m['b']}")
    if result["identical"]:
        console.out.print("identical")


@app.command()
def average(
    srcs: List[str] = typer.Argument(..., help="Checkpoints to average (paths or references), or one run (all its complete steps)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output HF model directory."),
    method: str = typer.Option("uniform", "--method", help="uniform, or ema (an exponential moving average over the inputs in order)."),
    decay: Optional[float] = typer.Option(None, "--decay", help="ema: the weight kept by the running average at each step, e.g. 0.9."),
    last: Optional[int] = typer.Option(None, "--last", help="LAWA: average the run's last K complete steps ..."),
    spacing: Optional[int] = typer.Option(None, "--spacing", help="LAWA: ... taken SPACING steps apart (default: consecutive intervals)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype (default: the first input's)."),
    eval_data: Optional[Path] = typer.Option(None, "--eval", help="Text or JSONL file: report the perplexity of the average next to every input's."),
    context: int = typer.Option(512, "--context", help="--eval: tokens per window."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
) -> None:
    """Average checkpoints (uniform, EMA, LAWA) into an HF model whose lineage names every input."""
    from mlc import console, options
    from mlc.commands.checkpoint.average import average_into, expand_sources, perplexities, weights_for
    from mlc.commands.checkpoint.sources import open_checkpoint, record_input
    from mlc.io.formats import ConvertOptions
    from mlc.models.config import dtype_name, parse_dtype
    from mlc.runs import open_run

    if spacing is not None and last is None:
        raise typer.BadParameter("--spacing goes with --last", param_hint="--spacing")
    config = {"srcs": srcs, "out": str(out), "method": method, "decay": decay, "last": last, "spacing": spacing, "dtype": dtype, "eval": str(eval_data) if eval_data else None}
    with open_run("checkpoint", config) as run:
        paths = expand_sources(srcs, options.get().runs_dir, last, spacing)
        weights = weights_for(len(paths), method, decay)
        for p in paths:
            record_input(run, p)
        ckpts = [open_checkpoint(p, None, ConvertOptions()) for p in paths]
        console.info(f"averaging {len(paths)} checkpoints ({method}{' + LAWA' if last else ''})")
        try:
            meta = {"method": method, "decay": decay, "lawa": {"last": last, "spacing": spacing} if last else None, "weights": weights, "inputs": [str(p) for p in paths]}
            with run.artifact("model", kind="model", out=out, overwrite=overwrite, meta=meta) as staging:
                average_into(ckpts, weights, staging, dtype_name(parse_dtype(dtype)) if dtype else None)
        finally:
            for c in ckpts:
                c.close()
        result: dict = {"run": run.id, "out": str(out.absolute()), "method": method, "inputs": [str(p) for p in paths], "weights": weights}
        if eval_data is not None:
            run.add_input(str(eval_data), role="data")
            ppl = perplexities(paths, out.absolute(), str(eval_data), context)
            result["perplexity"] = ppl[str(out.absolute())]
            result["input_perplexities"] = {p: v for p, v in ppl.items() if p != str(out.absolute())}
        run.set_summary(**{k: v for k, v in result.items() if k != "run"})
    if options.want_json(json_output):
        console.print_json(result)
        return
    console.out.print(f"wrote {result['out']} ({method} of {len(paths)} checkpoints)")
    if "perplexity" in result:
        for p, v in result["input_perplexities"].items():
            console.out.print(f"  perplexity {v:10.4f}  {p}", highlight=False)
        console.out.print(f"  perplexity {result['perplexity']:10.4f}  average", highlight=False)
