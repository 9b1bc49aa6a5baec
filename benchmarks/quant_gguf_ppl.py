"""Perplexity of `mlc quantize --format gguf` files under llama.cpp (llama-cpp-python) next to mlc's on the same weights.

For each setting: `mlc quantize MODEL --scheme ... --no-eval` writes the HF layout, mlc_gguf turns it into one GGUF file
the way `--format gguf` does (mlc.commands.quantize.gguf_out.export_gguf: the same integers as Q8_0/Q4_0 blocks),
and both are scored on mlc's held-out eval.txt with the same tokens and the same disjoint 512-token windows:
mlc with its weights dequantised exactly (fp32 compute, as benchmarks/quant_quality.py), llama.cpp with its own CPU
kernels (which round the activations to Q8_0 for the quantised dot products). --hf DIR scores an existing quantised
directory (e.g. an AWQ output) the same way.

    .venv/bin/python benchmarks/quant_gguf_ppl.py MODEL_DIR --setting "int4 -g 64" --setting "int8" [--hf DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
EVAL_CONTEXT = 512


def llama_cpp_perplexity(gguf_file: Path, ids: list[int]) -> float:
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    from mlc.models.evaluate import windows

    default = lib.llama_model_default_params

    def without_repacking():  # ggml's AMX matmul crashes in this VM (see tests/quantize/test_gguf_out.py)
        params = default()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without_repacking
    try:
        llm = llama_cpp.Llama(str(gguf_file), n_ctx=EVAL_CONTEXT, n_batch=EVAL_CONTEXT, logits_all=True, verbose=False, n_threads=2)
    finally:
        lib.llama_model_default_params = default
    nll, count = 0.0, 0
    for begin, end, scored in windows(len(ids), EVAL_CONTEXT, EVAL_CONTEXT):
        llm.reset()
        llm.eval(ids[begin:end])
        n = end - begin
        logits = torch.tensor(np.array(llm.scores[n - scored - 1 : n - 1]), dtype=torch.float32)
        targets = torch.tensor(ids[end - scored : end])
        nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += scored
    return math.exp(nll / count)


def main() -> None:
    from quant_quality import perplexity_of, run_setting

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--setting", action="append", default=[])
    ap.add_argument("--hf", action="append", default=[], type=Path, help="an existing quantised HF directory to export and score")
    args = ap.parse_args()

    from mlc.commands.quantize.gguf_out import export_gguf
    from mlc.data import eval_text_path
    from mlc.models import load_model
    from mlc.models.quant_load import load_quantized_model, quant_modules
    from mlc.models.tokenizer import load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="quant-gguf-"))
    dirs = []
    for i, setting in enumerate(args.setting):
        r = run_setting(args.model, setting, work / f"hf{i}", work / "runs")
        if "error" in r:
            sys.exit(f"{setting}: {r['error']}")
        dirs.append((setting, work / f"hf{i}"))
    dirs += [(str(d), d) for d in args.hf]
    ids = load_tokenizer(args.model).encode(eval_text_path().read_text(encoding="utf-8"))
    with torch.inference_mode():
        base = perplexity_of(load_model(args.model, dtype=torch.float32), ids)
    print(f"\nfp32 perplexity {base:.4f} on {len(ids)} tokens of eval.txt (windows of {EVAL_CONTEXT})\n")
    print("| setting | GGUF types | GGUF MB | mlc perplexity | llama.cpp perplexity | llama.cpp / mlc | llama.cpp s |")
    print("|---|---|---|---|---|---|---|")
    for setting, hf in dirs:
        out = work / f"gguf-{hf.name}"
        out.mkdir()
        export_gguf(hf, out)
        with torch.inference_mode():
            model = load_quantized_model(hf, dtype=torch.float32)
            for m in quant_modules(model).values():
                m.exact = True
            mine = perplexity_of(model, ids)
            del model
        import gguf

        types = sorted({t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors})
        start = time.perf_counter()
        theirs = llama_cpp_perplexity(out / "model.gguf", ids)
        seconds = time.perf_counter() - start
        print(f"| `{setting}` | {', '.join(types)} | {(out / 'model.gguf').stat().st_size / 1e6:.1f} | {mine:.4f} | {theirs:.4f} | "
              f"{theirs / mine:.4f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
