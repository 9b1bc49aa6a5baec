"""Measure a model's perplexity on a text or JSONL file (sliding-window protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mlc.cliutil import new_app

app = new_app("Measure a model's perplexity on a text or JSONL file (sliding-window protocol).")


@app.command()
def eval(
    model: str = typer.Argument(..., help="A model directory or reference (run:<id>, latest:<command>)."),
    data: Optional[Path] = typer.Option(
        None, "--data", "-d", help="Plain text, or JSONL with a 'text' field per line. Default: mlc's bundled held-out text."
    ),
    context: int = typer.Option(512, "--context", help="Tokens per window."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Tokens between window starts (default: context / 2)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: as stored)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Score only the first N tokens of the data."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
) -> None:
    """Report perplexity: windows of --context tokens every --stride tokens, each token scored once."""
    import time

    from mlc import console, options
    from mlc.io.texts import read_texts
    from mlc.models import load_model
    from mlc.models.evaluate import HELDOUT_TEXT, perplexity, tokenize_texts
    from mlc.models.tokenizer import load_tokenizer
    from mlc.runs import open_run

    data = data or HELDOUT_TEXT
    config = {"model": model, "data": str(data), "context": context, "stride": stride, "dtype": dtype, "max_tokens": max_tokens}
    with open_run("eval", config) as run:
        model_dir = run.add_input(model, role="model")
        run.add_input(str(data), role="data")
        texts = read_texts(data)
        tokenizer = load_tokenizer(model_dir)
        net = load_model(model_dir, dtype=dtype)
        ids = tokenize_texts(tokenizer, texts)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        start = time.perf_counter()
        with _progress() as tick:
            result = perplexity(net, ids, context=context, stride=stride, progress=tick)
        seconds = time.perf_counter() - start
        summary = {**result.to_dict(), "seconds": round(seconds, 3), "dtype": str(next(net.parameters()).dtype).removeprefix("torch.")}
        run.log_metrics(summary)
        run.set_summary(**summary)
        summary["run"] = run.id
    if options.want_json(json_output):
        console.print_json(summary)
        return
    console.out.print(
        f"perplexity {result.perplexity:.4f}  (nll {result.nll:.4f} nats/token over {result.tokens} tokens, "
        f"{result.windows} windows of {result.context} every {result.stride}, {seconds:.1f}s)"
    )
    console.info(f"run {summary['run']}")


def _progress():
    """A context manager yielding progress(done, total): a rich bar on a terminal, nothing otherwise."""
    import contextlib

    from mlc import console

    @contextlib.contextmanager
    def bar():
        if not console.progress_enabled():
            yield None
            return
        from rich.progress import Progress

        with Progress(console=console.err, transient=True) as p:
            task = p.add_task("scoring windows", total=None)
            yield lambda done, total: p.update(task, completed=done, total=total)

    return bar()
