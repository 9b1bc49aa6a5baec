"""Quantise a model's weights (int8, int4, nf4, fp8, llm-int8, gptq, awq, daq, mixed) into a loadable HF directory."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mlc.cliutil import new_app

app = new_app("Quantise a model's weights (int8, int4, nf4, fp8, llm-int8, gptq, awq, daq, mixed) into a loadable HF directory.")

SCHEMES_HELP = (
    "Scheme plugin: int8 | int4 [--group-size 32/64/128, --asymmetric] | nf4 [--group-size] | fp8 | "
    "llm-int8 | gptq [--bits 4/8, --group-size, --asymmetric, --no-act-order] | awq [--bits 4/8, --group-size, --asymmetric] | daq [--codebook nf4/fp4, --group-size] | "
    "mixed (--target-bits B | --target-size BYTES) | q4_k_m (--format gguf: llama.cpp's Q4_K_M mix, from the full-precision weights)."
)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="A model directory or reference (run:<id>, latest:<command>)."),
    scheme: str = typer.Option(..., "--scheme", "-s", help=SCHEMES_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the quantised model to."),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-g", help="Weights per scale (int4, gptq, nf4, daq). Default: the largest of 128/64/32 that divides every quantised layer's input features."),
    asymmetric: bool = typer.Option(False, "--asymmetric", help="int4/gptq: a zero point per group (default symmetric)."),
    bits: Optional[int] = typer.Option(None, "--bits", help="gptq: 4 (default) or 8."),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order", help="gptq: quantise the most active input features first (default on)."),
    codebook: Optional[str] = typer.Option(None, "--codebook", help="daq: nf4 (default) or fp4."),
    target_bits: Optional[float] = typer.Option(None, "--target-bits", help="mixed: average bits per quantised weight."),
    target_size: Optional[int] = typer.Option(None, "--target-size", help="mixed: size of the output's weights, in bytes."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text or JSONL (default: mlc's bundled corpus)."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Calibration windows (default 128)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per calibration window (default 512)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Keep layers matching this shell pattern unquantised (repeatable), e.g. '*.down_proj'."),
    quantize_head: bool = typer.Option(False, "--quantize-head", help="Quantise lm_head too (a tied head is untied; the embeddings stay)."),
    out_format: str = typer.Option("hf", "--format", help="hf: a Hugging Face directory (the layout of the scheme). gguf: OUT/model.gguf for llama.cpp, "
                                   "the same integers as Q8_0 (int8) or Q4_0 (int4) blocks (int8, int4, gptq, awq, mixed; symmetric only), "
                                   "or --scheme q4_k_m: llama.cpp's k-quants, quantised from the source weights (k-quant grids cannot hold mlc's int4 exactly)."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Measure perplexity before and after on the bundled held-out text."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
) -> None:
    """Quantise MODEL with --scheme into --out, and report perplexity, size and the worst layers."""
    import os

    # Before torch loads OpenMP (as `mlc train`): idle threads sleep instead of spinning. Quantising runs many
    # small per-group ops; on a CPU shared with other jobs (load 20 on 2 cores) spinning made AWQ's scale search
    # 20x slower (21 int4 roundings of a 192x256 weight: 11.5 s vs 0.53 s with 2 threads).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from mlc.commands.quantize.run import QuantizeArgs, run_quantize

    run_quantize(QuantizeArgs(
        model=model, scheme=scheme, out=out, group_size=group_size, asymmetric=asymmetric, bits=bits, act_order=act_order,
        codebook=codebook, target_bits=target_bits, target_size=target_size, calib=calib, samples=samples, seq_len=seq_len,
        exclude=list(exclude or []), quantize_head=quantize_head, out_format=out_format, evaluate=evaluate, overwrite=overwrite, json_output=json_output,
    ))
