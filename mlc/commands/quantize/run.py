"""`mlc quantize` as a run: check the inputs, quantise into the output artifact, evaluate, report."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

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
    evaluate: bool = True
    overwrite: bool = False
    json_output: bool = False


@contextlib.contextmanager
def _progress() -> Iterator[Callable[[str, int, int], None] | None]:
    from mlc import console

    if not console.progress_enabled():
        yield None
        return
    from rich.progress import Progress

    with Progress(console=console.err, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def tick(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        yield tick


def release_freed_memory() -> None:
    """Make glibc hand freed tensors back to the OS at once.

    Quantising reads, converts and frees hundreds of tensors of a few MiB. After the first large
    free, glibc raises its mmap threshold (up to 32 MiB) and keeps such blocks in its heap, where
    fragmentation holds on to them: measured on SmolLM2 int4, peak RSS 722 MB with the default,
    515 MB with a fixed 1 MiB threshold (tensors above it are mmapped and unmapped on free).
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def run_quantize(args: QuantizeArgs) -> dict[str, Any]:
    """Run `mlc quantize`; returns the report (also written to the run directory and printed)."""
    import torch

    release_freed_memory()
    from mlc import console, options, plugins
    from mlc.commands.quantize.calibration import load_calibration
    from mlc.commands.quantize.quantize import QuantizeRequest, quantize_model
    from mlc.commands.quantize.report import build_report, evaluate_pair, print_report
    from mlc.commands.quantize.schemes import SchemeOptions
    from mlc.data import corpus_path, eval_text_path
    from mlc.io.hfdir import require_model_dir
    from mlc.runs import open_run

    scheme = plugins.load_one("quant_schemes", args.scheme)
    opts = scheme.options(SchemeOptions(
        group_size=args.group_size, asymmetric=args.asymmetric, bits=args.bits, act_order=args.act_order,
        codebook=args.codebook, target_bits=args.target_bits, target_size=args.target_size,
    ))
    if not scheme.needs_calibration and (args.calib or args.samples or args.seq_len):
        raise MlcUsageError(f"scheme {scheme.name} rounds to nearest and uses no calibration", "drop --calib, --samples and --seq-len")
    samples, seq_len = args.samples or DEFAULT_SAMPLES, args.seq_len or DEFAULT_SEQ_LEN
    if samples < 1 or seq_len < 2:
        raise MlcUsageError("--samples must be at least 1 and --seq-len at least 2", "e.g. --samples 128 --seq-len 512")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items() if k != "json_output"}
    with open_run("quantize", config) as run:
        model_dir = require_model_dir(run.add_input(args.model, role="model"))
        tokens = None
        if scheme.needs_calibration:
            from mlc.models.tokenizer import load_tokenizer

            calib = args.calib or corpus_path()
            run.add_input(str(calib), role="calibration")
            tokens = load_calibration(Path(calib), load_tokenizer(model_dir), samples, seq_len)
        request = QuantizeRequest(model_dir, scheme, opts, args.exclude, args.quantize_head, tokens)
        torch.manual_seed(0)
        with _progress() as tick:
            with run.artifact("model", kind="model", out=args.out, overwrite=args.overwrite,
                              meta={"scheme": scheme.name, "options": opts.given()}) as staging:
                result = quantize_model(request, staging, tick)
            quant_dir = args.out.absolute()
            quality = None
            if args.evaluate:
                quality = evaluate_pair(model_dir, quant_dir, eval_text_path(), EVAL_CONTEXT,
                                        (lambda what: tick(what, 0, 1)) if tick else None)
        from mlc.io.safetensors_reader import ModelTensors

        with ModelTensors(model_dir) as t:
            total_params = sum(t.info(n).numel for n in t.names())
        report = build_report(scheme.name, opts.given(), model_dir, quant_dir, result, total_params, quality)
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
