"""LoRA SFT on the real SmolLM2-135M-Instruct: held-out loss falls, and the adapter loads with peft onto transformers."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import DATA, mlc_train, train_runs, write_config

SEQ_LEN, EVAL_SEQS = 128, 8


def sft_config(model_dir) -> str:
    return f"""
[model]
init = "{model_dir}"
[data]
mode = "sft"
train = "{DATA / 'corpus' / 'chat_train.jsonl'}"
eval = "{DATA / 'corpus' / 'chat_eval.jsonl'}"
seq_len = {SEQ_LEN}
[train]
steps = 6
batch_size = 4
micro_batch_size = 4
precision = "bf16"
[optim]
lr = 2e-3
[schedule]
kind = "constant"
warmup_steps = 1
[lora]
enabled = true
r = 8
alpha = 16
target_modules = ["q_proj", "v_proj"]
[eval]
max_sequences = {EVAL_SEQS}
[log]
tensorboard = false
"""


def held_out_loss(model, samples) -> float:
    """Mean loss over the assistant tokens of the first held-out sequences, computed by transformers' model."""
    x, y, mask = samples.batch(list(range(EVAL_SEQS)))
    with torch.no_grad():
        logits = model(input_ids=x).logits
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
    return (losses[mask.flatten()].sum() / mask.sum()).item()


@pytest.mark.realmodel
@pytest.mark.slow
def test_lora_sft_lowers_held_out_loss_and_the_adapter_loads_with_peft(smollm2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mlc.commands.train.batches import PackedSamples
    from mlc.commands.train.tokens import tokenize_file, tokenizer_hash
    from mlc.models.tokenizer import load_tokenizer

    runs = tmp_path / "runs"
    mlc_train(write_config(tmp_path, sft_config(smollm2_dir)), runs)
    (run,) = train_runs(runs)
    record = json.loads((run / "run.json").read_text())
    adapter = record["artifacts"]["adapter"]["path"]
    assert json.loads((run / "artifacts" / "adapter" / "manifest.json").read_text())["kind"] == "adapter"

    tokens = tokenize_file(DATA / "corpus" / "chat_eval.jsonl", "sft", load_tokenizer(smollm2_dir), tokenizer_hash(smollm2_dir), 49152)
    samples = PackedSamples(tokens, SEQ_LEN)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    before = held_out_loss(base, samples)
    tuned = PeftModel.from_pretrained(base, adapter).eval()
    after = held_out_loss(tuned, samples)
    assert after < before - 0.05, (before, after)
    # transformers + peft see the same model mlc trained: its own final evaluation, on the same sequences (mlc
    # evaluates in bf16 autocast, transformers here in fp32).
    assert after == pytest.approx(record["summary"]["eval_loss"], abs=0.03)
