"""Quality, size, time and peak memory of `mlc quantize` schemes on one model, side by side.

Each setting runs as its own `mlc quantize ... --no-eval --json` process (wall time and peak RSS of
that process, from wait4), then every output is scored with the same evaluator as the quantize report
(mlc.models.evaluate.perplexity on mlc's held-out eval.txt, disjoint 512-token windows, weights
dequantised exactly, fp32 compute) next to the original model's perplexity. Prints a markdown table.

    .venv/bin/python benchmarks/quant_quality.py MODEL_DIR --label smollm2 \
        --setting "int8" --setting "int4 -g 64" --setting "gptq -g 64" ... [--json-out results.json]

--report FILE scores an output already made by `mlc quantize ... --no-eval --json > FILE` instead
(its time and memory then come from `/usr/bin/time -v`, in FILE with .json replaced by .time, if there).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

EVAL_CONTEXT = 512


def run_setting(model: Path, setting: str, out: Path, runs: Path) -> dict:
    args = shlex.split(setting)
    cmd = [sys.executable, "-m", "mlc", "--runs-dir", str(runs), "quantize", str(model), "--scheme", args[0], *args[1:],
           "--out", str(out), "--no-eval", "--json", "--overwrite"]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS, not the running maximum of all children
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read()
    if code != 0:
        return {"setting": setting, "error": stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {code}"}
    return {"setting": setting, "report": json.loads(stdout), "wall_seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu_seconds": usage.ru_utime + usage.ru_stime}


def from_report(path: Path) -> dict:
    """A result from an earlier run's JSON report, with wall time and peak RSS from its /usr/bin/time -v log."""
    report = json.loads(path.read_text())
    r = {"setting": " ".join(f"{k}={v}" for k, v in {"scheme": report["scheme"], **report["options"]}.items()),
         "report": report, "wall_seconds": float("nan"), "peak_rss_mb": float("nan")}
    timing = path.with_suffix(".time")
    if timing.is_file():
        fields = dict(line.strip().rsplit(": ", 1) for line in timing.read_text().splitlines() if ": " in line)
        r["peak_rss_mb"] = int(fields.get("Maximum resident set size (kbytes)", "0")) / 1024
        h, _, rest = fields.get("Elapsed (wall clock) time (h:mm:ss or m:ss)", "0:0").rpartition(":")
        r["wall_seconds"] = float(rest) + 60 * sum(int(x) * 60**i for i, x in enumerate(reversed(h.split(":"))) if x)
        r["cpu_seconds"] = float(fields.get("User time (seconds)", 0)) + float(fields.get("System time (seconds)", 0))
    return r


def perplexity_of(model, ids: list[int]) -> float:
    from mlc.models.evaluate import perplexity

    return perplexity(model, ids, context=EVAL_CONTEXT, stride=EVAL_CONTEXT).perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--label", default="model")
    ap.add_argument("--setting", action="append", default=[], help='scheme and flags, e.g. "gptq -g 64 --act-order"')
    ap.add_argument("--report", action="append", default=[], type=Path, help="the --json output of an `mlc quantize` run to score")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--max-tokens", type=int, help="score only the first N tokens of eval.txt (default: all)")
    args = ap.parse_args()

    from mlc.data import eval_text_path
    from mlc.models import load_model
    from mlc.models.quant_load import load_quantized_model, quant_modules
    from mlc.models.tokenizer import load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="quant-quality-"))
    results = []
    for i, setting in enumerate(args.setting):
        r = run_setting(args.model, setting, work / f"out{i}", work / "runs")
        if "report" in r:
            r["report"]["out"] = str(work / f"out{i}")
        results.append(r)
        done = r.get("error") or f"{r['wall_seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB"
        print(f"# {setting}: {done}", file=sys.stderr, flush=True)
    for path in args.report:
        results.append(from_report(path))
    ids = load_tokenizer(args.model).encode(eval_text_path().read_text(encoding="utf-8"))[: args.max_tokens]
    with torch.inference_mode():
        base = perplexity_of(load_model(args.model, dtype=torch.float32), ids)
        for i, r in enumerate(results):
            if "error" in r:
                continue
            model = load_quantized_model(r["report"]["out"], dtype=torch.float32)
            for m in quant_modules(model).values():
                m.exact = True
            r["perplexity"] = perplexity_of(model, ids)
            r["increase_pct"] = 100 * (r["perplexity"] / base - 1)
            del model
    print(f"\n{args.label}: fp32 perplexity {base:.4f} on {len(ids)} tokens of eval.txt (windows of {EVAL_CONTEXT})\n")
    print("| setting | bits/param (quantised layers) | size MB | perplexity | increase | quantise s | process wall s | process CPU s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| `{r['setting']}` | error: {r['error']} | | | | | | | |")
            continue
        rep = r["report"]
        print(f"| `{r['setting']}` | {rep['bits_per_param_quantized_layers']:.3f} | {rep['size_bytes'] / 1e6:.1f} | "
              f"{r['perplexity']:.4f} | {r['increase_pct']:+.2f}% | {rep['quantize_seconds']:.1f} | {r['wall_seconds']:.1f} | "
              f"{r.get('cpu_seconds', float('nan')):.1f} | {r['peak_rss_mb']:.0f} |")
    if args.json_out:
        args.json_out.write_text(json.dumps({"label": args.label, "base_perplexity": base, "tokens": len(ids), "results": results},
                                            indent=2, default=str))


if __name__ == "__main__":
    main()
