"""LLM.int8's calibration forward of one SmolLM2 decoder block: the module with statistic hooks against the fused forward.

Both gather max |x| of every Linear's input over the same calibration chunks (the bundled corpus, 4096-token chunks
as `mlc quantize` runs them) and alternate in one process, so both see the same load. Prints the median wall and
process CPU time per chunk of each and their ratio, and how many of the block's input features fall on the other
side of LLM.int8's 6.0 threshold (the fused passes round a value differently now and then).

    .venv/bin/python benchmarks/quant_calib_block.py [MODEL_DIR] [--layer 5] [--samples 16] [--reps 5]

OMP_WAIT_POLICY is PASSIVE unless set, as in `mlc quantize`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `mlc quantize` sets it, before torch loads OpenMP
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from mlc.commands.quantize import calib_forward, layerwise
    from mlc.commands.quantize.calibration import load_calibration
    from mlc.commands.quantize.llm_int8 import THRESHOLD
    from mlc.commands.quantize.quantize import meta_model
    from mlc.data import corpus_path
    from mlc.io.safetensors_reader import ModelTensors
    from mlc.models.rope import RotaryTable
    from mlc.models.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", type=Path, default=Path.home() / ".cache/mlc/smollm2/hf-bbfd1486fe9e")
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if calib_forward.library() is None:
        sys.exit(f"no fused kernels: {calib_forward.unavailable_reason()}")

    model = meta_model(args.model)
    tokens = load_calibration(corpus_path(), load_tokenizer(args.model), args.samples, args.seq_len)
    bf16 = layerwise.COMPUTE_DTYPE
    with ModelTensors(args.model) as t, torch.no_grad():
        hidden = torch.nn.functional.embedding(tokens, t.read("model.embed_tokens.weight", bf16))
        cos, sin = RotaryTable(model.config).cos_sin(torch.arange(args.seq_len).unsqueeze(0), bf16)
        layers = model.model.layers
        for i in range(args.layer + 1):  # the block's real inputs: the blocks before it run once
            layers[i].to_empty(device="cpu")
            layerwise._materialize(layers[i], f"model.layers.{i}.", t, bf16)
            if i < args.layer:
                hidden = layerwise._forward_chunks(lambda h, i=i: layers[i](h, cos, sin)[0], hidden, layerwise.CHUNK_TOKENS // args.seq_len)
        layer = layers[args.layer]
        rows = layerwise.CHUNK_TOKENS // args.seq_len
        chunks = [hidden[s : s + rows] for s in range(0, hidden.shape[0], rows)]
        names = {n: n for n in calib_forward.GROUPS}

        def hooked() -> dict[str, torch.Tensor]:
            stats = {n: layerwise.AbsMaxStat(layer.get_submodule(n).in_features) for n in names}
            cache: dict = {}
            handles = [layer.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: stats[n].add(a[0], cache)) for n in names]
            for c in chunks:
                cache.clear()
                layer(c, cos, sin)
            for h in handles:
                h.remove()
            return {n: s.value() for n, s in stats.items()}

        block = calib_forward.fused_block(layer, cos, sin)

        def fused() -> dict[str, torch.Tensor]:
            maxima = {g: torch.zeros(layer.get_submodule(n).in_features) for n, g in calib_forward.GROUPS.items()}
            for c in chunks:
                block(c, maxima, True)
            return {n: maxima[g] for n, g in calib_forward.GROUPS.items()}

        timings: dict[str, tuple[list[float], list[float]]] = {"module + hooks": ([], []), "fused": ([], [])}
        results = {}
        for rep in range(args.reps + 1):
            for name, fn in (("module + hooks", hooked), ("fused", fused)):
                w0, c0 = time.perf_counter(), time.process_time()
                results[name] = fn()
                if rep:  # the first round warms both up
                    timings[name][0].append((time.perf_counter() - w0) / len(chunks))
                    timings[name][1].append((time.process_time() - c0) / len(chunks))
    base_wall, base_cpu = (statistics.median(x) for x in timings["module + hooks"])
    print(f"SmolLM2 block {args.layer}, {len(chunks)} chunks of {rows} x {args.seq_len} tokens, {torch.get_num_threads()} threads, "
          f"median of {args.reps}")
    print("| forward | wall ms per chunk | x module | CPU ms per chunk | x module |")
    print("|---|---|---|---|---|")
    for name, (wall, cpu) in timings.items():
        w, c = statistics.median(wall), statistics.median(cpu)
        print(f"| {name} | {w * 1e3:.1f} | {w / base_wall:.2f} | {c * 1e3:.1f} | {c / base_cpu:.2f} |")
    a, b = results["module + hooks"], results["fused"]
    moved = sum(int(((a[n] >= THRESHOLD) != (b[n] >= THRESHOLD)).sum()) for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"))
    worst = max(float(((a[n] - b[n]).abs() / a[n].clamp_min(1e-6)).max()) for n in names)
    print(f"input features on the other side of {THRESHOLD}: {moved}; largest relative difference of a maximum: {worst:.2e}")


if __name__ == "__main__":
    main()
