"""`mlc quantize` as a run: check the inputs, quantise into the output artifact, evaluate, report."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlc.commands.quantize.memory import release_freed_memory
from mlc.errors import MlcUsageError

DEFAULT_SAMPLES, DEFAULT_SEQ_LEN = 128, 512
EVAL_CONTEXT = 512


@dataclass
class QuantizeArgs:
    model: str
    scheme: str
    out: Path
    group_size: int | None = None
    asymmetric: bool = False
    bits: int | None = None
    act_order: bool | None = None  # None: the scheme's default
    codebook: str | None = None
    target_bits: float | None = None
    target_size: int | None = None
    calib: Path | None = None
    samples: int | None = None
    seq_len: int | None = None
    exclude: list[str] = field(default_factory=list)
    quantize_head: bool = False
    out_format: str = "hf"  # or "gguf"
    evaluate: bool = True
    overwrite: bool = False
    json_output: bool = False


def _quantize_to_gguf(request: Any, staging: Path, model_dir: Path, evaluate: bool, tick: Any) -> tuple[Any, dict[str, Any] | None]:
    """Quantise into a scratch HF directory inside staging, write staging/model.gguf from it, evaluate it, drop it.

    The perplexity is mlc's on the very integers the GGUF file holds (its scales rounded to fp16 aside).
    """
    import shutil

    from mlc.commands.quantize.gguf_out import export_gguf
    from mlc.commands.quantize.quantize import quantize_model
    from mlc.commands.quantize.report import evaluate_pair
    from mlc.data import eval_text_path

    scratch = staging / ".hf"
    scratch.mkdir()
    try:
        result = quantize_model(request, scratch, tick)
        if tick:
            tick("writing GGUF", 0, 1)
        export_gguf(scratch, staging)
        if tick:
            tick("writing GGUF", 1, 1)
        quality = evaluate_pair(model_dir, scratch, eval_text_path(), EVAL_CONTEXT, tick) if evaluate else None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result, quality


def _k_quants_to_gguf(model_dir: Path, staging: Path, evaluate: bool, tick: Any) -> tuple[Any, dict[str, Any] | None]:
    """staging/model.gguf in llama.cpp's Q4_K_M from the full-precision weights, and mlc's perplexity of the file's weights."""
    from mlc.commands.quantize.gguf_out import export_k_quants, gguf_weights_model
    from mlc.commands.quantize.report import evaluate_pair
    from mlc.data import eval_text_path

    result = export_k_quants(model_dir, staging, tick)
    quality = None
    if evaluate:
        gguf_file = staging / "model.gguf"
        quality = evaluate_pair(model_dir, staging, eval_text_path(), EVAL_CONTEXT, tick, lambda: gguf_weights_model(model_dir, gguf_file))
    return result, quality


def run_quantize(args: QuantizeArgs) -> dict[str, Any]:
    """Run `mlc quantize`; returns the report (also written to the run directory and printed)."""
    import torch

    release_freed_memory()
    from mlc import console, options, plugins
    from mlc.commands.quantize.calibration import load_calibration
    from mlc.commands.quantize.progress import progress
    from mlc.commands.quantize.quantize import QuantizeRequest, check_not_quantized, choose_group_size, meta_model, quantize_model, target_layers
    from mlc.commands.quantize.report import build_report, evaluate_pair, print_report
    from mlc.contracts import QuantScheme, SchemeOptions
    from mlc.data import corpus_path, eval_text_path
    from mlc.io.hfdir import require_model_dir
    from mlc.runs import open_run

    scheme: QuantScheme = plugins.load_one("quant_schemes", args.scheme)  # load_one rejects any other type
    given = SchemeOptions(
        group_size=args.group_size, asymmetric=args.asymmetric, bits=args.bits, act_order=args.act_order,
        codebook=args.codebook, target_bits=args.target_bits, target_size=args.target_size,
    )
    scheme.options(given)  # option errors before a run directory exists
    if args.out_format not in ("hf", "gguf"):
        raise MlcUsageError(f"--format {args.out_format} is not one mlc quantize writes", "use --format hf (default) or --format gguf")
    if args.out_format == "gguf":
        from mlc.commands.quantize.gguf_out import check_gguf_scheme

        check_gguf_scheme(scheme, args.asymmetric)
    if scheme.format == "gguf":
        if args.out_format != "gguf":
            raise MlcUsageError(f"--scheme {scheme.name} writes a GGUF file only", "add --format gguf")
        if args.exclude or args.quantize_head:
            raise MlcUsageError(f"--scheme {scheme.name} follows llama.cpp's per-tensor rule, which --exclude and --quantize-head do not change",
                                "drop --exclude and --quantize-head")
    if not scheme.needs_calibration and (args.calib or args.samples or args.seq_len):
        raise MlcUsageError(f"scheme {scheme.name} rounds to nearest and uses no calibration", "drop --calib, --samples and --seq-len")
    samples, seq_len = args.samples or DEFAULT_SAMPLES, args.seq_len or DEFAULT_SEQ_LEN
    if samples < 1 or seq_len < 2:
        raise MlcUsageError("--samples must be at least 1 and --seq-len at least 2", "e.g. --samples 128 --seq-len 512")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items() if k != "json_output"}
    with open_run("quantize", config) as run:
        model_dir = require_model_dir(run.add_input(args.model, role="model"))
        check_not_quantized(model_dir)
        opts, group_choice = choose_group_size(scheme, given, target_layers(meta_model(model_dir), args.exclude, args.quantize_head))
        if group_choice:
            console.info(f"group size {group_choice.group_size}: {group_choice.reason()} (--group-size sets it)")
        tokens = None
        if scheme.needs_calibration:
            from mlc.models.tokenizer import load_tokenizer

            calib = args.calib or corpus_path()
            run.add_input(str(calib), role="calibration")
            tokens = load_calibration(Path(calib), load_tokenizer(model_dir), samples, seq_len)
        request = QuantizeRequest(model_dir, scheme, opts, args.exclude, args.quantize_head, tokens)
        torch.manual_seed(0)
        with progress() as tick:
            with run.artifact("model", kind="model", out=args.out, overwrite=args.overwrite,
                              meta={"scheme": scheme.name, "options": opts.given()}) as staging:
                if scheme.format == "gguf":
                    result, quality = _k_quants_to_gguf(model_dir, staging, args.evaluate, tick)
                elif args.out_format == "gguf":
                    result, quality = _quantize_to_gguf(request, staging, model_dir, args.evaluate, tick)
                else:
                    result = quantize_model(request, staging, tick)
            quant_dir = args.out.absolute()
            if args.out_format == "hf":
                quality = evaluate_pair(model_dir, quant_dir, eval_text_path(), EVAL_CONTEXT, tick) if args.evaluate else None
        from mlc.io.safetensors_reader import ModelTensors

        with ModelTensors(model_dir) as t:
            total_params = sum(t.info(n).numel for n in t.names())
        report = build_report(scheme.name, opts.given(), model_dir, quant_dir, result, total_params, quality)
        if group_choice:
            report["group_size_chosen"] = {"group_size": group_choice.group_size, "why": group_choice.reason()}
        report["format"] = args.out_format
        report["out"] = str(quant_dir)
        report["run"] = run.id
        (run.path / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        run.log_metrics({k: v for k, v in report.items() if isinstance(v, (int, float))} | (quality or {}))
        run.set_summary(scheme=scheme.name, bits_per_param=report["bits_per_param_quantized_layers"],
                        size_bytes=report["size_bytes"], **({"perplexity_before": quality["perplexity_before"],
                                                           "perplexity_after": quality["perplexity_after"]} if quality else {}))
    if options.want_json(args.json_output):
        console.print_json(report)
    else:
        print_report(report)
        console.info(f"wrote {quant_dir} (run {report['run']})")
    return report
