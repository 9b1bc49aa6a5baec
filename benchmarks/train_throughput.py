"""mlc's training step vs a plain transformers + torch loop: same model config, same batches, tokens/s and MFU.

    .venv/bin/python benchmarks/train_throughput.py [--steps 12] [--reps 3] [--seq-len 256] [--batch 8]

mlc runs its real trainer (`mlc.commands.train.loop.train`: data pipeline, native model, bf16 autocast, its
optimizer) with and without `train.compile`; the peer is LlamaForCausalLM from transformers with the same config and
weights' shapes, bf16 autocast and torch.optim.AdamW, fed the same packed corpus batches. Each is measured as the
median step time over `steps` steps (the first two are warm-up), repeated `reps` times alternating the contenders,
and the median repetition is reported. MFU divides the achieved model FLOP/s (torchtitan's count) by this CPU's
measured peak: the best of a few large bf16 matmuls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlc import options  # noqa: E402
from mlc.commands.train.batches import PackedSamples, SampleOrder, micro_batch_positions  # noqa: E402
from mlc.commands.train.config import load_config  # noqa: E402
from mlc.commands.train.model import flops_per_token  # noqa: E402
from mlc.commands.train.tokens import tokenize_file, tokenizer_hash  # noqa: E402
from mlc.models import config_from_hf  # noqa: E402
from mlc.models.tokenizer import load_tokenizer  # noqa: E402

DATA = REPO / "mlc" / "data"
MODEL = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=2048, hidden_size=512, intermediate_size=1536,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
    tie_word_embeddings=True, rms_norm_eps=1e-5,
)


def cpu_peak_flops() -> float:
    """The best bf16 matmul rate of this machine (FLOP/s): the denominator of CPU MFU."""
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    best = 0.0
    for _ in range(6):
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * 2048**3 / (time.perf_counter() - t))
    return best


def mlc_rate(workdir: Path, steps: int, seq_len: int, batch: int, compile_: bool) -> float:
    """Median tokens/s of mlc's own trainer over the steps after the first two."""
    from mlc.commands.train.loop import train

    config_text = f"""
[model]
config = "{workdir / 'model'}"
tokenizer = "{DATA / 'tiny'}"
[data]
train = "{DATA / 'corpus' / 'train.txt'}"
val_fraction = 0.0
seq_len = {seq_len}
[train]
steps = {steps}
batch_size = {batch}
micro_batch_size = {batch}
precision = "bf16"
compile = {str(compile_).lower()}
[checkpoint]
resume = "none"
[log]
tensorboard = false
"""
    path = workdir / "bench.toml"
    path.write_text(config_text)
    config, text = load_config(path)
    options.get().runs_dir = workdir / "runs"
    run_dir = Path(train(config, text)["run_dir"])
    rates = [json.loads(l)["tokens_per_s"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    return statistics.median(rates[2:])


def hf_rate(steps: int, seq_len: int, batch: int) -> float:
    """Median tokens/s of a plain loop: transformers' Llama, bf16 autocast, AdamW, the same corpus batches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = {k: v for k, v in MODEL.items() if k not in ("architectures", "model_type")}
    model = LlamaForCausalLM(LlamaConfig(**cfg)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tok = DATA / "tiny"
    data = tokenize_file(DATA / "corpus" / "train.txt", "pretrain", load_tokenizer(tok), tokenizer_hash(tok), MODEL["vocab_size"])
    samples = PackedSamples(data, seq_len)
    order = SampleOrder(len(samples), 0)
    times = []
    for step in range(steps):
        t = time.perf_counter()
        x, y, _ = samples.batch([order[p] for p in micro_batch_positions(step, 0, 0, 1, batch, batch)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t)
    return batch * seq_len / statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "model").mkdir()
        (workdir / "model" / "config.json").write_text(json.dumps(MODEL))
        fpt = flops_per_token(config_from_hf(dict(MODEL)), args.seq_len)
        peak = cpu_peak_flops()
        results: dict[str, list[float]] = {"transformers + torch loop": [], "mlc train": [], "mlc train (compile)": []}
        for _ in range(args.reps):
            results["transformers + torch loop"].append(hf_rate(args.steps, args.seq_len, args.batch))
            results["mlc train"].append(mlc_rate(workdir, args.steps, args.seq_len, args.batch, False))
            results["mlc train (compile)"].append(mlc_rate(workdir, args.steps, args.seq_len, args.batch, True))
    base = statistics.median(results["transformers + torch loop"])
    print(f"model: Llama {MODEL['num_hidden_layers']}x{MODEL['hidden_size']}, vocab {MODEL['vocab_size']}, seq {args.seq_len}, batch {args.batch}, bf16 autocast, {torch.get_num_threads()} threads")
    print(f"FLOPs/token {fpt / 1e6:.1f} M; CPU peak (best bf16 2048^3 matmul) {peak / 1e9:.0f} GFLOP/s")
    print(f"{'contender':28s} {'tokens/s':>10s} {'MFU':>7s} {'vs peer':>8s}   (reps: tokens/s)")
    for name, rates in results.items():
        rate = statistics.median(rates)
        print(f"{name:28s} {rate:10.0f} {100 * fpt * rate / peak:6.1f}% {rate / base:7.2f}x   {', '.join(f'{r:.0f}' for r in rates)}")


if __name__ == "__main__":
    main()
