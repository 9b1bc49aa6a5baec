"""Turn an `mlc train` checkpoint (DCP, any step) of the bundled tiny model into an HF directory.

Used for the "model mlc trained" quality figures in benchmarks/RESULTS.md when the training run was
stopped before its final export:

    .venv/bin/python examples/quantize/checkpoint_to_hf.py RUN_DIR/checkpoints/step-00000060 OUT_DIR
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from mlc.data import tiny_model_dir
from mlc.io.hfdir import read_config
from mlc.models import build_model, save_model


def main(checkpoint: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "state.pt"
        dcp_to_torch_save(str(checkpoint), str(flat))
        state = torch.load(flat, weights_only=False)
    weights = state["train"]["model"] if "train" in state else {k.removeprefix("train.model."): v for k, v in state.items() if k.startswith("train.model.")}
    model = build_model(read_config(tiny_model_dir()), dtype=torch.float32)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise SystemExit(f"checkpoint does not match the tiny model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    save_model(model, out, tokenizer_from=tiny_model_dir())
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
