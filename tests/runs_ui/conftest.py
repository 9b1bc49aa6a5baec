"""A small runs root made through mlc's own run API (no model, no torch): data -> prepare -> train -> quantize, and a stray eval."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Chain:
    root: Path
    data: Path
    prepare: str
    train: str
    quantize: str
    other: str  # an unrelated run: never in the chain's lineage
    losses: list[float]


def make_chain(root: Path, tmp: Path) -> Chain:
    from mlc.runs import open_run

    data = tmp / "corpus.txt"
    data.write_text("bees make honey\n")
    with open_run("prepare", runs_root=root, argv=["mlc", "prepare"]) as prep:
        prep.add_input(str(data), role="data")
        with prep.artifact("tokens", kind="dataset") as staging:
            (staging / "tokens.bin").write_bytes(b"\x01\x02")
    losses = [4.0, 3.1, 2.5, 2.2, 2.05]
    with open_run("train", config={"lr": 0.01}, runs_root=root, argv=["mlc", "train", "x.toml"]) as train:
        train.add_input(f"run:{prep.id}/tokens", role="train-data")
        for step, loss in enumerate(losses, start=1):
            train.log_metrics({"step": step * 10, "loss": loss, "lr": 0.01 / step})
        train.log("<script>alert(1)</script> a log line with markup in it")
        with train.artifact("model") as staging:
            (staging / "model.safetensors").write_bytes(b"weights")
        train.set_summary(final_loss=losses[-1])
    with open_run("quantize", runs_root=root, argv=["mlc", "quantize"]) as quant:
        quant.add_input(f"run:{train.id}", role="model")
        with quant.artifact("model") as staging:
            (staging / "model.safetensors").write_bytes(b"int8 weights")
    with open_run("eval", runs_root=root, argv=["mlc", "eval"]) as other:
        other.log_metrics({"perplexity": 12.5})
    return Chain(root, data, prep.id, train.id, quant.id, other.id, losses)


@pytest.fixture
def chain(runs_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Chain:
    monkeypatch.chdir(tmp_path)  # outside the repository: recording the git commit costs nothing here
    return make_chain(runs_root, tmp_path)


@pytest.fixture
def client(chain: Chain):
    from fastapi.testclient import TestClient

    from mlc.commands.runs.ui.app import create_app

    return TestClient(create_app(chain.root), base_url="http://127.0.0.1", raise_server_exceptions=False)


def write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
