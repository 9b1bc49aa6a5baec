"""DPO on the tiny model: the margin rises, and the held-out loss equals the paper's formula computed in transformers
from the saved policy and the starting model, on pairs tokenised here by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from .conftest import DATA, loss_curve, metrics, mlc_train, train_runs, write_config

PAIRS = 16
BETA = 0.5


@pytest.fixture(scope="module")
def start_model(tmp_path_factory) -> Path:
    """The tiny model with random weights and its tokenizer: the policy's start and DPO's reference."""
    from mlc.models import build_model, save_model

    out = tmp_path_factory.mktemp("tiny-init") / "model"
    raw = json.loads((DATA / "tiny" / "config.json").read_text())
    save_model(build_model(raw, seed=0, dtype="float32"), out, tokenizer_from=DATA / "tiny")
    return out


def dpo_config(tmp_path: Path, init: Path, extra: str = "") -> Path:
    lines = (DATA / "corpus" / "preference_train.jsonl").read_text().splitlines()[:PAIRS]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    return write_config(tmp_path, f"""
[model]
init = "{init}"
[data]
mode = "dpo"
train = "{pairs}"
eval = "{pairs}"
seq_len = 160  # longer than every sequence of these pairs (at most 141 tokens): nothing is cut
[train]
steps = 12
batch_size = 8
micro_batch_size = 4
[optim]
lr = 3e-3
[schedule]
kind = "constant"
[dpo]
beta = {BETA}
[eval]
interval = 4
max_sequences = {PAIRS}
[checkpoint]
interval = 4
[log]
tensorboard = false
{extra}""")


def chatml(messages: list[dict]) -> str:
    """The tiny tokenizer's ChatML template, written out by hand."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def formula_loss(policy_dir: str, reference_dir: Path, pairs_file: Path) -> float:
    """Mean -log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))) over the pairs, every piece computed here."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(str(DATA / "tiny" / "tokenizer.json"))
    models = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (policy_dir, reference_dir)]

    def logp(model, prompt_ids: list[int], reply_ids: list[int]) -> float:
        ids = torch.tensor([prompt_ids + reply_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        picked = logprobs[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
        return picked[len(prompt_ids) - 1 :].sum().item()  # the reply's tokens only

    losses = []
    for line in pairs_file.read_text().splitlines():
        pair = json.loads(line)
        prompt = tok.encode(chatml(pair["prompt"]) + "<|im_start|>assistant\n", add_special_tokens=False).ids
        # The reply after the generation prompt: its text and the end-of-turn marker.
        replies = [tok.encode(chatml(pair[k])[len(f"<|im_start|>{pair[k][0]['role']}\n"):], add_special_tokens=False).ids for k in ("chosen", "rejected")]
        pi_w, pi_l = (logp(models[0], prompt, r) for r in replies)
        ref_w, ref_l = (logp(models[1], prompt, r) for r in replies)
        margin = BETA * ((pi_w - ref_w) - (pi_l - ref_l))
        losses.append(-math.log(1 / (1 + math.exp(-margin))))
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_full_dpo_raises_the_margin_and_its_loss_is_the_formulas(start_model, tmp_path):
    runs = tmp_path / "runs"
    mlc_train(dpo_config(tmp_path, start_model), runs)
    (run,) = train_runs(runs)
    curve = loss_curve(run)
    assert curve[1] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the first step
    evals = [m for m in metrics(run) if "eval_margin" in m]
    margins = [m["eval_margin"] for m in evals]
    assert [m["step"] for m in evals] == [4, 8, 12] and margins[0] > 0 and margins[2] > margins[1] > margins[0], margins
    assert evals[-1]["eval_accuracy"] >= 0.9
    summary = json.loads((run / "run.json").read_text())["summary"]
    expected = formula_loss(summary["artifact"], start_model, tmp_path / "pairs.jsonl")
    assert summary["eval_loss"] == pytest.approx(expected, abs=1e-4)
    assert (run / "dpo-reference" / "train.pt").is_file()


@pytest.mark.slow
def test_lora_dpo_resumes_with_the_cached_reference_log_probs(start_model, tmp_path):
    runs = tmp_path / "runs"
    config = dpo_config(tmp_path, start_model, "[lora]\nenabled = true\nr = 8\nalpha = 16\n")
    killed = mlc_train(config, runs, env={"MLC_FAULT_KILL": "after-step:6"}, check=False)
    assert killed.returncode == -9
    (run,) = train_runs(runs)
    cached = run / "dpo-reference" / "train.pt"
    written = cached.stat().st_mtime_ns
    mlc_train(config, runs)
    assert cached.stat().st_mtime_ns == written  # read back, not computed again from the trained policy
    assert (run / "log.txt").read_text().count("reference log-probs of") == 1
    evals = [m["eval_margin"] for m in metrics(run) if "eval_margin" in m]
    assert evals[-1] > evals[0] > 0
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and "adapter" in record["artifacts"]
