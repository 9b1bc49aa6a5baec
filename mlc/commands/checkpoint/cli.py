"""Convert checkpoints between formats (Hugging Face, GGUF and any installed format plugin)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mlc.cliutil import new_app

app = new_app("Convert checkpoints between formats (Hugging Face, GGUF and any installed format plugin).")


@app.callback()
def checkpoint() -> None:
    """Checkpoint tools: convert between formats."""


@app.command()
def convert(
    src: Path = typer.Argument(..., help="The checkpoint to convert (file or directory)."),
    to: str = typer.Option(..., "--to", help="Target format: hf (a Hugging Face model directory)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    source_format: Optional[str] = typer.Option(None, "--from", help="Source format name (default: detected)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Weight dtype: float32, bfloat16, float16 (default: the format's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
) -> None:
    """Convert SRC to --to FORMAT, writing a complete output directory atomically and recording a run."""
    from mlc import console, options
    from mlc.errors import MlcUsageError
    from mlc.io.formats import HF, detect_format, get_format
    from mlc.models.config import parse_dtype
    from mlc.runs import open_run

    if to != HF:
        raise MlcUsageError(f"--to {to!r} is not a format mlc can write yet", "use --to hf")
    torch_dtype = parse_dtype(dtype)
    config = {"src": str(src), "to": to, "out": str(out), "from": source_format, "dtype": dtype}
    with open_run("checkpoint", config) as run:
        path = run.add_input(str(src), role="checkpoint")
        fmt = get_format(source_format) if source_format else detect_format(path)
        console.info(f"converting {path} ({fmt.name}) to a Hugging Face directory")
        with run.artifact("model", kind="model", out=out, overwrite=overwrite, meta={"from": fmt.name}) as staging:
            fmt.to_hf(path, staging, dtype=torch_dtype)
        run.set_summary(source_format=fmt.name, out=str(out.absolute()))
        result = {"run": run.id, "from": fmt.name, "to": to, "out": str(out.absolute())}
    if options.want_json(json_output):
        console.print_json(result)
    else:
        console.out.print(f"wrote {result['out']} ({fmt.name} -> hf)")
