"""Perplexity of `mlc quantize --format gguf` files under llama.cpp (llama-cpp-python) next to mlc's on the same weights.

For each setting: `mlc quantize MODEL --scheme ... --no-eval` writes the HF layout, mlc_gguf turns it into one GGUF file
the way `--format gguf` does (mlc.commands.quantize.gguf_out.export_gguf: the same integers as Q8_0/Q4_0 blocks),
and both are scored on mlc's held-out eval.txt with the same tokens and the same disjoint 512-token windows:
mlc with its weights dequantised exactly (fp32 compute, as benchmarks/quant_quality.py), llama.cpp with its own CPU
kernels (which round the activations to Q8_0 for the quantised dot products). --hf DIR scores an existing quantised
directory (e.g. an AWQ output) the same way.
A setting with `--format gguf` (`"q4_k_m --format gguf"`) is written as GGUF by `mlc quantize` itself; mlc then scores
the weights the file holds (gguf-py's dequantisation). --llama-quantize adds llama.cpp's own Q4_K_M of the same
weights (llama_model_quantize on an F32 export), the peer of mlc's k-quant quantiser.

    .venv/bin/python benchmarks/quant_gguf_ppl.py MODEL_DIR --setting "int4 -g 64" --setting "int8" [--hf DIR]
    .venv/bin/python benchmarks/quant_gguf_ppl.py MODEL_DIR --setting "q4_k_m --format gguf" --llama-quantize
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


def llama_quantize_q4_k_m(model: Path, work: Path) -> Path:
    """llama.cpp's own Q4_K_M of model (its quantiser, no importance matrix) from an F32 GGUF export; the file's path."""
    import ctypes

    import llama_cpp

    from mlc.io.formats import ConvertOptions, get_format

    src = work / "f32"
    src.mkdir()
    ckpt = get_format("hf").open(model, ConvertOptions())
    get_format("gguf").write(ckpt, src, ConvertOptions(quant="F32"))
    ckpt.close()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    out = work / "llama-quantize"
    out.mkdir()
    if llama_cpp.llama_model_quantize(str(src / "model.gguf").encode(), str(out / "model.gguf").encode(), ctypes.byref(params)):
        sys.exit("llama_model_quantize failed")
    (src / "model.gguf").unlink()
    return out


def compare_files(mine: Path, theirs: Path) -> str:
    """How mlc's Q4_K_M file compares with llama-quantize's: types per tensor, identical blocks, weight error."""
    import gguf

    a = {t.name: t for t in gguf.GGUFReader(mine).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    if a.keys() != b.keys():
        return "different tensor names"
    differ = [n for n in a if a[n].tensor_type != b[n].tensor_type]
    same: dict[str, list[float]] = {}
    for name, t in a.items():
        if name in differ or t.tensor_type.name in ("F32", "F16"):
            continue
        size = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
        x, y = (np.asarray(u.data).reshape(-1, size) for u in (t, b[name]))
        same.setdefault(t.tensor_type.name, []).extend(np.all(x == y, axis=1).tolist())
    blocks = ", ".join(f"{k} {100 * np.mean(v):.2f}% of {len(v)}" for k, v in sorted(same.items()))
    return f"tensor types differ in {len(differ)} of {len(a)} tensors; identical blocks: {blocks}"


def main() -> None:
    from quant_quality import perplexity_of, run_setting

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--setting", action="append", default=[])
    ap.add_argument("--hf", action="append", default=[], type=Path, help="an existing quantised HF directory to export and score")
    ap.add_argument("--llama-quantize", action="store_true", help="also score llama.cpp's own Q4_K_M of the model")
    args = ap.parse_args()

    from mlc.commands.quantize.gguf_out import export_gguf, gguf_weights_model
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
        print(f"{setting}: mlc quantize {r['wall_seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        dirs.append((setting, work / f"hf{i}"))
    dirs += [(str(d), d) for d in args.hf]
    if args.llama_quantize:
        start = time.perf_counter()
        dirs.append(("llama-quantize Q4_K_M", llama_quantize_q4_k_m(args.model, work)))
        print(f"llama_model_quantize (with the F32 export): {time.perf_counter() - start:.1f} s wall", flush=True)
    ids = load_tokenizer(args.model).encode(eval_text_path().read_text(encoding="utf-8"))
    with torch.inference_mode():
        base = perplexity_of(load_model(args.model, dtype=torch.float32), ids)
    print(f"\nfp32 perplexity {base:.4f} on {len(ids)} tokens of eval.txt (windows of {EVAL_CONTEXT})\n")
    print("| setting | GGUF types | GGUF MB | mlc perplexity | llama.cpp perplexity | llama.cpp / mlc | llama.cpp s |")
    print("|---|---|---|---|---|---|---|")
    for setting, hf in dirs:
        if (hf / "model.gguf").is_file():  # written as GGUF already: mlc scores the weights the file holds
            out = hf
            model = gguf_weights_model(args.model, out / "model.gguf")
        else:
            out = work / f"gguf-{hf.name}"
            out.mkdir()
            export_gguf(hf, out)
            model = load_quantized_model(hf, dtype=torch.float32)
            for m in quant_modules(model).values():
                m.exact = True
        with torch.inference_mode():
            mine = perplexity_of(model, ids)
            del model
        import gguf

        types = sorted({t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors})
        start = time.perf_counter()
        theirs = llama_cpp_perplexity(out / "model.gguf", ids)
        seconds = time.perf_counter() - start
        print(f"| `{setting}` | {', '.join(types)} | {(out / 'model.gguf').stat().st_size / 1e6:.1f} | {mine:.4f} | {theirs:.4f} | "
              f"{theirs / mine:.4f} | {seconds:.0f} |", flush=True)
    k_quants = [hf for setting, hf in dirs if setting.startswith("q4_k_m")]
    if args.llama_quantize and k_quants:
        print(f"\nmlc's Q4_K_M against llama-quantize's: {compare_files(k_quants[0] / 'model.gguf', work / 'llama-quantize' / 'model.gguf')}")


if __name__ == "__main__":
    main()
