"""Checkpoints as mlc train really writes them (a short run of the bundled tiny model), and logits to compare."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TRAIN_TOML = """
[model]
config = "{model}"
[data]
mode = "pretrain"
train = "{corpus}"
seq_len = 32
[train]
steps = 6
batch_size = 4
micro_batch_size = {micro}
seed = 0
parallel = "{parallel}"
[checkpoint]
interval = 2
keep_last_k = 3
[log]
tensorboard = false
"""


def train_run(root: Path, nproc: int = 1, parallel: str = "ddp") -> Path:
    """A train run directory holding complete DCP steps 2 and 4 (saved on nproc processes)."""
    from mlc import data

    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "train.toml"
    cfg.write_text(TRAIN_TOML.format(model=data.tiny_model_dir(), corpus=data.corpus_path(), micro=4 // nproc, parallel=parallel))
    argv = [sys.executable, "-m", "mlc", "--runs-dir", str(root / "runs"), "train", str(cfg)]
    if nproc > 1:
        argv += ["--nproc-per-node", str(nproc)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return next((root / "runs").glob("*-train-*"))


@pytest.fixture(scope="session")
def train_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(tmp_path_factory.mktemp("train"))


def torch_reference_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """torch's own DCP reader (format_utils.dcp_to_torch_save), flattened: the independent reference."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = step_dir.parent / f"{step_dir.name}.reference.pt"
    if not flat.exists():
        dcp_to_torch_save(str(step_dir), str(flat))
    state = torch.load(flat, weights_only=False)
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj: object) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, torch.Tensor):
            out[prefix] = obj

    walk("", state)
    return out


def hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits for ids (the reference implementation, float32)."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(ids).logits


def safetensors_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
