"""Muon vs AdamW on the tiny model: how many steps Muon needs to reach AdamW's final held-out loss.

    .venv/bin/python benchmarks/train_muon_vs_adamw.py [--steps 60] [--every 5]

Both run the pretraining recipe examples/train/pretrain_tiny.toml unchanged except optim.name (same lr: Moonlight's
match_rms_adamw scale lets AdamW's hyper-parameters carry over), with a held-out evaluation every `every` steps.
The ratio is (first evaluated step at which Muon's eval loss <= AdamW's final eval loss) / steps; < 1 means Muon
gets there sooner. Deterministic for a given machine (same seed, same batches).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def eval_curve(optimizer: str, steps: int, every: int, runs: Path, extra: list[str]) -> dict[int, float]:
    from mlc import options
    from mlc.commands.train.config import load_config
    from mlc.commands.train.loop import train

    sets = [f'optim.name="{optimizer}"', f"train.steps={steps}", f"eval.interval={every}", "checkpoint.interval=0",
            'checkpoint.resume="none"', "log.tensorboard=false", *extra]
    config, text = load_config(REPO / "examples" / "train" / "pretrain_tiny.toml", sets)
    options.get().runs_dir = runs
    run_dir = Path(train(config, text)["run_dir"])
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["eval_loss"] for m in lines if "eval_loss" in m}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra section.key=value for both runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        adamw = eval_curve("adamw", args.steps, args.every, Path(tmp), args.sets)
        muon = eval_curve("muon", args.steps, args.every, Path(tmp), args.sets)
    target = adamw[args.steps]
    reached = next((s for s in sorted(muon) if muon[s] <= target), None)
    print(f"{'step':>5s} {'adamw':>8s} {'muon':>8s}")
    for s in sorted(adamw):
        print(f"{s:5d} {adamw[s]:8.4f} {muon[s]:8.4f}")
    if reached is None:
        print(f"Muon did not reach AdamW's final eval loss {target:.4f} within {args.steps} steps (ratio > 1)")
    else:
        print(f"AdamW's final eval loss {target:.4f} after {args.steps} steps; Muon reached it at step {reached}: ratio {reached / args.steps:.2f}")


if __name__ == "__main__":
    main()
