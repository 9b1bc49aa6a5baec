"""mlc's training step vs a plain transformers + torch loop: same model config, same batches, tokens/s and MFU.

    .venv/bin/python benchmarks/train_throughput.py [--steps 10] [--reps 3] [--seq-len 256] [--batch 8] [--threads N]

Both contenders train the same Llama config (bf16 autocast, AdamW, grad clipping at 1.0) on the same packed corpus
batches, one optimizer step per batch:
- mlc: the trainer's own step (mlc.commands.train.step: step_batches and Trainer.train_step, as `mlc train` runs it) on the
  native model built by mlc.commands.train.model.create_model, eager and with `train.compile` (compiled blocks and loss);
- peer: transformers' LlamaForCausalLM, its loss computed from its logits, torch.optim.AdamW.
Each contender runs `steps` steps (the first two are warm-up, compilation included), `reps` times, alternating.
Reported per contender: the median over repetitions of the median step, as wall-clock tokens/s and as tokens per
CPU-second of this process (steadier on a shared machine). MFU divides torchtitan's model FLOP/s by this CPU's
measured peak (the best of a few 2048^3 bf16 matmuls, on the same threads).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlc.commands.train.batches import PackedSamples, SampleOrder, micro_batch_positions
from mlc.commands.train.config import load_config
from mlc.commands.train.loss import summed_cross_entropy
from mlc.commands.train.model import blocks, create_model, flops_per_token
from mlc.commands.train.optim import build_optimizers
from mlc.commands.train.step import Trainer, autocast, step_batches
from mlc.commands.train.tokens import tokenize_file, tokenizer_hash
from mlc.distributed import dist as mdist
from mlc.models import config_from_hf
from mlc.models.tokenizer import load_tokenizer

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
    for _ in range(8):
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * 2048**3 / (time.perf_counter() - t))
    return best


def corpus(seq_len: int) -> tuple[PackedSamples, SampleOrder]:
    tok = DATA / "tiny"
    data = tokenize_file(DATA / "corpus" / "train.txt", "pretrain", load_tokenizer(tok), tokenizer_hash(tok), MODEL["vocab_size"])
    samples = PackedSamples(data, seq_len)
    return samples, SampleOrder(len(samples), 0)


def timed(step_fn, steps: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds) of step_fn(step) over the steps after the first two."""
    wall, cpu = [], []
    for step in range(steps):
        w, c = time.perf_counter(), time.process_time()
        step_fn(step)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall[2:]), statistics.median(cpu[2:])


def mlc_step_times(workdir: Path, steps: int, seq_len: int, batch: int, compile_: bool) -> tuple[float, float]:
    path = workdir / "bench.toml"
    path.write_text(f"""
[model]
config = "{workdir / 'model'}"
tokenizer = "{DATA / 'tiny'}"
[data]
train = "{DATA / 'corpus' / 'train.txt'}"
seq_len = {seq_len}
[train]
batch_size = {batch}
micro_batch_size = {batch}
precision = "bf16"
compile = {str(compile_).lower()}
[optim]
lr = 3e-4
""")
    config, _ = load_config(path)
    info = mdist.DistInfo(0, 1, 0, torch.device("cpu"))
    model = create_model(config, None)
    loss_fn = summed_cross_entropy
    if compile_:
        for block in blocks(model):
            block.compile()
        loss_fn = torch.compile(summed_cross_entropy)
    trainer = Trainer(model, build_optimizers(model, config.optim), config, model.config, info, loss_fn, autocast("bf16", info.device))
    samples, order = corpus(seq_len)

    def step(i: int) -> None:
        micro, n_targets = step_batches(samples, order, i, 1, config, info)
        loss_sum, norm, _ = trainer.train_step(micro, n_targets)  # clips at train.grad_clip = 1.0
        torch.cat([loss_sum.reshape(1) / n_targets, norm.reshape(1)]).tolist()

    return timed(step, steps)


def hf_step_times(steps: int, seq_len: int, batch: int) -> tuple[float, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = {k: v for k, v in MODEL.items() if k not in ("architectures", "model_type")}
    model = LlamaForCausalLM(LlamaConfig(**cfg)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    samples, order = corpus(seq_len)

    def step(i: int) -> None:
        x, y, _ = samples.batch([order[p] for p in micro_batch_positions(i, 0, 0, 1, batch, batch)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return timed(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    contenders = {
        "transformers + torch loop": lambda: hf_step_times(args.steps, args.seq_len, args.batch),
        "mlc step (eager)": lambda: mlc_step_times(workdir, args.steps, args.seq_len, args.batch, False),
        "mlc step (compile)": lambda: mlc_step_times(workdir, args.steps, args.seq_len, args.batch, True),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        workdir = Path(tmp)
        (workdir / "model").mkdir()
        (workdir / "model" / "config.json").write_text(json.dumps(MODEL))
        peak = cpu_peak_flops()
        for _ in range(args.reps):
            for name, run in contenders.items():
                results[name].append(run())
    fpt = flops_per_token(config_from_hf(dict(MODEL)), args.seq_len)
    tokens = args.batch * args.seq_len
    base_wall = tokens / statistics.median(w for w, _ in results["transformers + torch loop"])
    base_cpu = tokens / statistics.median(c for _, c in results["transformers + torch loop"])
    print(f"model: Llama {MODEL['num_hidden_layers']}x{MODEL['hidden_size']} (vocab {MODEL['vocab_size']}), seq {args.seq_len} x batch {args.batch}, "
          f"bf16 autocast, {torch.get_num_threads()} threads; {args.steps} steps x {args.reps} reps")
    print(f"FLOPs/token {fpt / 1e6:.1f} M; CPU peak (best bf16 2048^3 matmul) {peak / 1e9:.0f} GFLOP/s")
    print(f"{'contender':28s} {'tokens/s':>9s} {'MFU':>6s} {'vs peer':>8s} {'tok/CPU-s':>10s} {'vs peer':>8s}")
    for name, times in results.items():
        wall = tokens / statistics.median(w for w, _ in times)
        cpu = tokens / statistics.median(c for _, c in times)
        print(f"{name:28s} {wall:9.0f} {100 * fpt * wall / peak:5.1f}% {wall / base_wall:7.2f}x {cpu:10.0f} {cpu / base_cpu:7.2f}x")


if __name__ == "__main__":
    main()
