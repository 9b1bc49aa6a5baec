"""Sliding-window perplexity: the protocol, agreement with a transformers computation, and `mlc eval`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mlc.errors import InputError
from mlc.io.texts import read_texts
from mlc.models.evaluate import HELDOUT_TEXT, perplexity, windows
from mlc.models.tokenizer import load_tokenizer


def test_overlapping_windows_score_every_token_after_the_first_exactly_once():
    # 10 tokens, windows of 4 every 2: [0,4) scores 1..3, then each window scores its last 2 tokens.
    assert windows(10, context=4, stride=2) == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert sum(s for *_, s in windows(1000, 128, 32)) == 999


def test_disjoint_windows_leave_each_window_start_unscored():
    assert windows(10, context=4, stride=4) == [(0, 4, 3), (4, 8, 3), (8, 10, 1)]


def hf_sliding_window_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """The recipe from transformers' docs, "Perplexity of fixed-length models", run on transformers' model.

    One correction: the docs count `valid labels - batch_size` loss tokens per window, but transformers
    shifts labels left, so only the first window (whose labels start at position 0) loses one; later
    windows score all trg_len labels. Counting the shifted labels that are not -100 fixes the weights.
    """
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += neg_log_likelihood.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


def test_perplexity_agrees_with_transformers_to_a_tenth_of_a_percent(smollm2_dir, smollm2_model, smollm2_hf_model):
    from transformers import AutoTokenizer

    text = HELDOUT_TEXT.read_text()[:2400]
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(text, return_tensors="pt").input_ids
    assert ids.shape[1] > 400
    expected = hf_sliding_window_perplexity(smollm2_hf_model, ids, max_length=256, stride=128)
    got = perplexity(smollm2_model, ids[0], context=256, stride=128)
    assert abs(got.perplexity - expected) / expected < 1e-3
    assert got.tokens == ids.shape[1] - 1
    assert 5 < got.perplexity < 200  # a working language model on English prose


def test_a_bad_window_is_refused_before_any_work(smollm2_model):
    with pytest.raises(InputError, match="context 9000 is outside"):
        perplexity(smollm2_model, list(range(100)), context=9000)
    with pytest.raises(InputError, match="stride 300"):
        perplexity(smollm2_model, list(range(100)), context=256, stride=300)


def test_eval_cli_reads_jsonl_reports_json_and_records_a_run(smollm2_dir, tmp_path, run_mlc):
    data = tmp_path / "data.jsonl"
    paragraphs = [p for p in HELDOUT_TEXT.read_text().split("\n\n") if len(p) > 300][:5]
    data.write_text("\n".join(json.dumps({"text": p, "id": i}) for i, p in enumerate(paragraphs)) + "\n")
    code, out, err = run_mlc("eval", smollm2_dir, "--data", data, "--context", "128", "--stride", "64", "--max-tokens", "300", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["tokens"] == 299 and report["windows"] == 4 and report["context"] == 128
    ids = load_tokenizer(smollm2_dir).encode("\n\n".join(read_texts(data)))[:300]
    assert report["perplexity"] == pytest.approx(math.exp(report["nll"]))
    assert len(ids) == 300
    run_dir = next(run_mlc.runs_dir.glob("*-eval-*"))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    assert record["summary"]["perplexity"] == report["perplexity"]
    assert {i["role"] for i in record["inputs"]} == {"model", "data"}


def test_eval_cli_names_the_jsonl_line_without_text(smollm2_dir, tmp_path, run_mlc):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    code, _, err = run_mlc("eval", smollm2_dir, "--data", data)
    assert code == 1 and "bad.jsonl:2 has no string field 'text'" in err
