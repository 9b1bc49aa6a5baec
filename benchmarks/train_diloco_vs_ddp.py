"""DiLoCo against DDP at equal tokens: bytes communicated per worker and the loss, on the tiny recipe.

    .venv/bin/python benchmarks/train_diloco_vs_ddp.py [--nproc 2] [--steps 60] [--inner-steps 10] [--set KEY=VALUE]

Runs examples/train/diloco_tiny.toml as it is and with train.parallel = "ddp" (the same global batches, lr and
schedule), both on --nproc gloo processes. DiLoCo's bytes are counted where they are sent (the uint8 codes and fp32
scales of each all-gather, metrics.jsonl's comm_bytes); DDP's are its gradient all-reduce payload, 4 bytes per
trainable parameter per step (fp32 buckets; the parameter count is read from the model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "train" / "diloco_tiny.toml"


def run(runs: Path, nproc: int, sets: list[str]) -> dict:
    argv = [sys.executable, "-m", "mlc", "--runs-dir", str(runs), "train", str(RECIPE), "--json", "--nproc-per-node", str(nproc)]
    for s in sets:
        argv += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    summary = json.loads(out.stdout)
    lines = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    summary["curve"] = {m["step"]: m["loss"] for m in lines if "loss" in m}
    summary["comm_bytes"] = max((m.get("comm_bytes", 0) for m in lines), default=0)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--set", action="append", default=[], help="another override for both runs (section.key=value)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from mlc.models import build_model

    model = build_model(json.loads((REPO / "mlc" / "data" / "tiny" / "config.json").read_text()))
    params = sum(p.numel() for p in model.parameters())
    common = [f"train.steps={args.steps}", "checkpoint.interval=0", 'checkpoint.resume="none"', "log.tensorboard=false",
              f"eval.interval={args.inner_steps * max(1, args.steps // (2 * args.inner_steps))}", *args.set]
    with tempfile.TemporaryDirectory() as tmp:
        ddp = run(Path(tmp) / "ddp", args.nproc, [*common, 'train.parallel="ddp"'])
        dil = run(Path(tmp) / "diloco", args.nproc, [*common, f"diloco.inner_steps={args.inner_steps}"])
    ddp_bytes = 4 * params * args.steps
    out = {
        "nproc": args.nproc, "steps": args.steps, "inner_steps": args.inner_steps, "params": params,
        "ddp_bytes_per_worker": ddp_bytes, "diloco_bytes_per_worker": dil["comm_bytes"],
        "reduction": round(ddp_bytes / dil["comm_bytes"], 1),
        "ddp_final_loss": round(ddp["final_loss"], 4), "diloco_final_loss": round(dil["final_loss"], 4),
        "ddp_eval_loss": round(ddp["eval_loss"], 4), "diloco_eval_loss": round(dil["eval_loss"], 4),
        "loss_every_10": {s: [round(ddp["curve"][s], 4), round(dil["curve"][s], 4)] for s in range(10, args.steps + 1, 10)},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
