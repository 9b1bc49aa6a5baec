"""On a CUDA device the native model still computes what transformers computes (skipped, with the reason shown, without one)."""

from __future__ import annotations

import pytest
import torch

from mlc.models import KVCache, load_model
from mlc.models.generate import generate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _hf(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()


@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen2", "mixtral", "qwen2_moe"])
def test_cuda_logits_and_cached_decoding_match_transformers(arch, tiny_hf_model):
    path = tiny_hf_model(arch)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0)).cuda()
    model = load_model(path, device="cuda")
    with torch.no_grad():
        expected = _hf(path)(ids).logits
        assert (model(ids).logits - expected).abs().max().item() <= 1e-4
        cache = KVCache(model.config, 2, 32, device="cuda")
        parts = [model(ids[:, :12], cache=cache).logits] + [model(ids[:, i : i + 1], cache=cache).logits for i in range(12, 20)]
    assert (torch.cat(parts, dim=1) - expected).abs().max().item() <= 1e-4


def test_cuda_bf16_logits_and_greedy_generation_match_transformers(tiny_hf_model):
    path = tiny_hf_model("llama")
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1)).cuda()
    ours, theirs = load_model(path, dtype="bf16", device="cuda"), _hf(path, torch.bfloat16)
    with torch.no_grad():
        assert (ours(ids).logits.float() - theirs(ids).logits.float()).abs().max().item() <= 0.02
    fp32_ours, fp32_theirs = load_model(path, device="cuda"), _hf(path)
    expected = fp32_theirs.generate(ids, max_new_tokens=16, do_sample=False)[0, 24:].tolist()
    assert generate(fp32_ours, ids[0].tolist(), 16, eos_token_ids=[fp32_ours.config.eos_token_id])[0] == expected
