"""QLoRA against plain LoRA on SmolLM2-135M-Instruct: weight memory and peak memory while training.

    .venv/bin/python benchmarks/train_qlora_memory.py --model ~/.cache/mlc/smollm2/hf-* [--steps 3] [--batch 4] [--seq 256]

Each variant runs in its own process with mlc train's own step (Trainer.train_step): the model in bf16, bf16 autocast,
LoRA r=8 on every projection, AdamW. `lora` keeps the base dense (bf16); `qlora` holds the blocks' linear layers in
NF4 (lora.base = "nf4"). Reported per variant:
- weights: bytes of the model's tensors (parameters, and the NF4 codes and scales);
- peak: the process's peak resident memory (VmHWM) over the training steps, reset after the model is built (so the
  transient dense copy while loading is not counted) and minus the resident memory at that point's baseline of
  Python and torch (VmRSS before the model is built);
- the held-out loss after the steps on the same sequences (QLoRA trains as well as LoRA).
On a GPU (when one is available) the same script reports torch.cuda.max_memory_allocated instead of VmHWM.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(variant: str, model_dir: str, steps: int, batch: int, seq: int) -> dict:
    import gc

    import torch

    from mlc.commands.train.batches import PackedSamples, SampleOrder
    from mlc.commands.train.config import from_dict
    from mlc.commands.train.loss import evaluate
    from mlc.commands.train.model import add_lora, create_model, model_config
    from mlc.commands.train.optim import build_optimizers
    from mlc.commands.train.qlora import Nf4Linear
    from mlc.commands.train.step import Trainer, autocast, step_batches
    from mlc.commands.train.tokens import tokenize_file, tokenizer_hash
    from mlc.distributed import dist as mdist
    from mlc.models.tokenizer import load_tokenizer

    torch.manual_seed(0)
    config = from_dict({
        "model": {"init": model_dir, "dtype": "bfloat16"},
        "data": {"mode": "sft", "train": str(REPO / "mlc/data/corpus/chat_train.jsonl"), "seq_len": seq},
        "train": {"steps": steps, "batch_size": batch, "micro_batch_size": batch, "precision": "bf16"},
        "optim": {"lr": 2e-3},
        "lora": {"enabled": True, "base": "nf4" if variant == "qlora" else "dense", "r": 8, "alpha": 16},
    })
    info = mdist.init()
    cuda = info.device.type == "cuda"
    tokenizer = load_tokenizer(Path(model_dir))
    tok_hash = tokenizer_hash(Path(model_dir))
    mcfg = model_config(config, Path(model_dir))
    train = PackedSamples(tokenize_file(REPO / "mlc/data/corpus/chat_train.jsonl", "sft", tokenizer, tok_hash, mcfg.vocab_size), seq)
    held_out = PackedSamples(tokenize_file(REPO / "mlc/data/corpus/chat_eval.jsonl", "sft", tokenizer, tok_hash, mcfg.vocab_size), seq)
    gc.collect()
    baseline_kib = _status_kib("VmRSS")

    model = add_lora(create_model(config, Path(model_dir)), config.lora).to(info.device)
    optimizers = build_optimizers(model, config.optim)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    nf4 = [m for m in model.modules() if isinstance(m, Nf4Linear)]
    weights += sum(m.codes.nbytes + m.scale.nbytes + m.codebook.nbytes for m in nf4)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the loading peak is not the training peak
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
    trainer = Trainer(model, optimizers, config, mcfg, info, autocast=autocast("bf16", info.device))
    order = SampleOrder(len(train), 0, True)
    for step in range(steps):
        micro, n_targets = step_batches(train, order, step, 1, config, info)
        trainer.train_step(micro, n_targets)
    peak = (torch.cuda.max_memory_allocated() - start_bytes) if cuda else (_status_kib("VmHWM") - baseline_kib) * 1024
    loss = evaluate(model, held_out, 8, batch, info, autocast("bf16", info.device))["eval_loss"]
    return {"variant": variant, "device": str(info.device), "nf4_layers": len(nf4), "weights_mib": weights / 2**20,
            "peak_mib": peak / 2**20, "peak_counts": "cuda max_memory_allocated" if cuda else "VmHWM - VmRSS baseline",
            "eval_loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="SmolLM2-135M-Instruct (or any HF Llama) directory")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.steps, args.batch, args.seq)))
        return
    rows = []
    for variant in ("lora", "qlora"):
        argv = [sys.executable, __file__, "--worker", variant, "--model", args.model, "--steps", str(args.steps),
                "--batch", str(args.batch), "--seq", str(args.seq)]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'variant':8s} {'nf4 layers':>10s} {'weights MiB':>12s} {'peak MiB':>9s} {'eval loss':>9s}")
    for r in rows:
        print(f"{r['variant']:8s} {r['nf4_layers']:10d} {r['weights_mib']:12.1f} {r['peak_mib']:9.1f} {r['eval_loss']:9.4f}")
    lora, qlora = rows
    print(f"qlora/lora: weights {qlora['weights_mib'] / lora['weights_mib']:.2f}x, peak {qlora['peak_mib'] / lora['peak_mib']:.2f}x "
          f"({rows[0]['peak_counts']}, {rows[0]['device']})")


if __name__ == "__main__":
    main()
