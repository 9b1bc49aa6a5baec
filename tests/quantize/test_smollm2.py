"""The real SmolLM2-135M: int8 keeps perplexity within 0.5%, and transformers reads mlc's int8 and int4 outputs
with the same logits as mlc's own dequantised model."""

import json

import pytest
import torch

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]


def _mlc_dequantised_logits(quant_dir, ids):
    from mlc.models import load_model
    from mlc.models.quant_load import quant_modules

    model = load_model(quant_dir, dtype=torch.float32)
    for m in quant_modules(model).values():
        m.exact = True
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("scheme", [["int8"], ["int4", "--group-size", "64"]])
def test_transformers_reads_mlc_quantised_smollm2(smollm2_dir, run_mlc, tmp_path, scheme):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    evaluate = [] if scheme[0] == "int8" else ["--no-eval"]
    code, stdout, stderr = run_mlc("quantize", smollm2_dir, "--scheme", *scheme, "--out", out, "--json", *evaluate)
    assert code == 0, stderr
    report = json.loads(stdout)
    if scheme[0] == "int8":
        assert report["quality"]["perplexity_increase_pct"] < 0.5
    ids = torch.tensor([[1, 504, 3458, 314, 260, 2496, 28, 357, 1423, 335, 1026, 30, 198, 504, 1767, 314]])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    assert (theirs - _mlc_dequantised_logits(out, ids)).abs().max() < 1e-3
