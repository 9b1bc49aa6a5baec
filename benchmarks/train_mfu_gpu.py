"""MFU of `mlc train` on one GPU: a ~125M-parameter Llama, bf16 autocast, compiled blocks. Target: >= 40%.

    PYTHONPATH=. python3 benchmarks/train_mfu_gpu.py            # on a CUDA machine: < 3 minutes
    PYTHONPATH=. python3 benchmarks/train_mfu_gpu.py --smoke    # tiny model, 3 steps, any device: checks the path

Self-contained: the model is built from a config written here, the data is the bundled corpus tokenised with the
bundled tiny tokenizer (the model's 32k vocabulary is larger than the tokenizer's, which costs the head its full
FLOPs as a real vocabulary would). It runs mlc's real trainer (mlc.commands.train.loop.train) and reads its
metrics.jsonl: MFU = torchtitan's FLOPs per token x tokens/s / the GPU's dense bf16 peak (mlc.distributed.flops table,
or --peak-flops). The figure is the median over the steps after the warm-up (compilation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / "mlc" / "data"

# 12 x 768, SwiGLU 2048, 32k vocabulary, untied: 85M in the blocks + 2 x 25M embeddings/head = 135M parameters.
MODEL = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32768, hidden_size=768, intermediate_size=2048,
    num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12, head_dim=64, max_position_embeddings=2048,
    tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0,
)
SMOKE = dict(MODEL, vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, head_dim=16, max_position_embeddings=256)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the median (compilation, allocator)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--peak-flops", type=float, default=0.0, help="the GPU's dense bf16 FLOP/s, if not in mlc's table")
    parser.add_argument("--smoke", action="store_true", help="a tiny model for 3 steps on any device (checks the script)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("train_mfu_gpu: no CUDA device here. This benchmark measures MFU on one NVIDIA GPU (H100/H200: "
              "PYTHONPATH=. python3 benchmarks/train_mfu_gpu.py); use --smoke to check the script on a CPU.")
        return 0
    model = SMOKE if args.smoke else MODEL
    steps, warmup = (3, 1) if args.smoke else (args.steps, args.warmup)
    seq_len, micro = (32, 2) if args.smoke else (args.seq_len, args.micro_batch)

    from mlc import options
    from mlc.commands.train.config import load_config
    from mlc.commands.train.loop import train
    from mlc.commands.train.model import flops_per_token, matmul_params
    from mlc.models import config_from_hf

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "model").mkdir()
        (work / "model" / "config.json").write_text(json.dumps(model))
        (work / "mfu.toml").write_text(f"""
[model]
config = "{work / 'model'}"
tokenizer = "{DATA / 'tiny'}"
[data]
train = "{DATA / 'corpus' / 'train.txt'}"
val_fraction = 0.0
seq_len = {seq_len}
[train]
steps = {steps}
batch_size = {micro}
micro_batch_size = {micro}
precision = "bf16"
compile = {str(not args.no_compile and not args.smoke).lower()}
grad_clip = 1.0
[optim]
lr = 6e-4
[schedule]
warmup_steps = 2
[checkpoint]
resume = "none"
[log]
tensorboard = false
peak_flops = {args.peak_flops}
""")
        config, text = load_config(work / "mfu.toml")
        options.get().runs_dir = work / "runs"
        started = time.perf_counter()
        summary = train(config, text, args.peak_flops)
        wall = time.perf_counter() - started
        lines = [json.loads(l) for l in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    lines = [l for l in lines if "tokens_per_s" in l][warmup:]
    cfg = config_from_hf(dict(model))
    rate = statistics.median(l["tokens_per_s"] for l in lines)
    mfus = [l["mfu"] for l in lines if l.get("mfu") is not None]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}; torch {torch.__version__}")
    print(f"model: Llama {cfg.num_hidden_layers}x{cfg.hidden_size}, vocab {cfg.vocab_size}, {matmul_params(cfg) / 1e6:.0f}M matmul params, "
          f"{flops_per_token(cfg, seq_len) / 1e6:.0f} MFLOPs/token; batch {micro} x {seq_len}, bf16 autocast, compile={config.train.compile}")
    print(f"steps {steps} ({warmup} warm-up) in {wall:.0f} s; final loss {summary['final_loss']:.3f}")
    print(f"tokens/s (median): {rate:,.0f}")
    if mfus:
        print(f"MFU (median): {100 * statistics.median(mfus):.1f}%   target >= 40%")
    else:
        print("MFU: no peak FLOP/s known for this device; pass --peak-flops")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
