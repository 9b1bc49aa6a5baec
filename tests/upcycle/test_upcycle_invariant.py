"""The sparse-upcycling invariant: identical experts, no drop, top-k-then-softmax routing give the dense
model's logits exactly (1e-5 in fp32), in transformers (MixtralForCausalLM, Qwen2MoeForCausalLM) and in mlc."""

from __future__ import annotations

import json

import pytest
import torch

from .upcycle_helpers import hf_logits, make_dense, mlc_logits, token_batch, upcycle

TOL = 1e-5


def check_invariant(dense, moe, architecture):
    assert json.loads((moe / "config.json").read_text())["architectures"] == [architecture]
    ids = token_batch()
    reference = hf_logits(dense, ids)
    upcycled = hf_logits(moe, ids)
    native = mlc_logits(moe, ids)
    assert reference.abs().max() > 0.5  # the logits carry signal: a 1e-5 match means something
    assert (upcycled - reference).abs().max().item() < TOL
    assert (native - upcycled).abs().max().item() < TOL


def test_mixtral_from_llama_keeps_the_dense_logits(tiny_llama, tmp_path, runs_root):
    out = upcycle(tiny_llama, tmp_path / "moe", experts=4, top_k=2)
    check_invariant(tiny_llama, out, "MixtralForCausalLM")


def test_qwen2_moe_with_shared_expert_keeps_the_dense_logits(tiny_llama, tmp_path, runs_root):
    out = upcycle(tiny_llama, tmp_path / "moe", experts=4, top_k=2, shared_expert=True)
    check_invariant(tiny_llama, out, "Qwen2MoeForCausalLM")


def test_qwen2_base_with_qkv_biases_upcycles_into_qwen2_moe(tiny_qwen2, tmp_path, runs_root):
    out = upcycle(tiny_qwen2, tmp_path / "moe", experts=3, top_k=1, shared_expert=True)
    check_invariant(tiny_qwen2, out, "Qwen2MoeForCausalLM")


def test_tied_embeddings_stay_tied(tiny_llama_tied, tmp_path, runs_root):
    out = upcycle(tiny_llama_tied, tmp_path / "moe", experts=2, top_k=2)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    check_invariant(tiny_llama_tied, out, "MixtralForCausalLM")


@pytest.mark.parametrize("shared_expert", [False, True])
def test_sliding_window_of_a_mistral_base_is_kept(tmp_path, runs_root, shared_expert):
    dense = make_dense(tmp_path / "mistral", family="mistral")  # window 8 < the 24 test tokens
    out = upcycle(dense, tmp_path / "moe", experts=2, top_k=1, shared_expert=shared_expert)
    check_invariant(dense, out, "Qwen2MoeForCausalLM" if shared_expert else "MixtralForCausalLM")


def test_bf16_output_of_an_fp32_base_is_the_rounded_copy(tiny_llama, tmp_path, runs_root):
    from safetensors.torch import load_file

    out = upcycle(tiny_llama, tmp_path / "moe", experts=2, top_k=1, dtype="bfloat16")
    dense = load_file(str(tiny_llama / "model.safetensors"))
    moe = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    expert = moe["model.layers.1.block_sparse_moe.experts.1.w2.weight"]
    assert expert.dtype == torch.bfloat16
    assert torch.equal(expert, dense["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16))


def test_the_invariant_check_detects_a_change_of_function(tiny_llama, tmp_path, runs_root):
    # The same comparison fails as soon as the experts differ (Drop-Upcycling): it can fail.
    out = upcycle(tiny_llama, tmp_path / "moe", experts=4, top_k=2, drop_ratio=0.5)
    ids = token_batch()
    assert (hf_logits(out, ids) - hf_logits(tiny_llama, ids)).abs().max().item() > 1e-2


def test_with_one_expert_per_token_the_invariant_is_exact_in_float64(tiny_llama, tmp_path, runs_root):
    # With top-1 the routing weight is p/p = 1 exactly; with top-2 transformers' float32 router softmax
    # makes w1 + w2 = 1 only to float32 rounding. So top-1 shows the construction itself is exact.
    ids = token_batch()
    reference = hf_logits(tiny_llama, ids, torch.float64)
    for shared in (False, True):
        out = upcycle(tiny_llama, tmp_path / f"moe-{shared}", experts=3, top_k=1, shared_expert=shared)
        assert (hf_logits(out, ids, torch.float64) - reference).abs().max().item() < 1e-12


@pytest.mark.realmodel
@pytest.mark.parametrize("shared_expert,experts,top_k", [(False, 2, 2), (True, 2, 1)])
def test_real_smollm2_keeps_its_logits(smollm2_dir, smollm2_hf_model, tmp_path, runs_root, shared_expert, experts, top_k):
    # In fp32, transformers' own SmolLM2 logits move by ~5e-5 (of ~30) when the same sequence is batched
    # with another one (another matmul shape, another summation order), and its router softmax runs in
    # float32: an absolute 1e-5 is below the reference's own noise. So the bound is 1e-5 of the logit scale.
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    out = upcycle(smollm2_dir, tmp_path / "moe", experts=experts, top_k=top_k, shared_expert=shared_expert)
    with torch.no_grad():
        reference = smollm2_hf_model(ids).logits
    scale = reference.abs().max().item()
    upcycled = hf_logits(out, ids)
    assert (upcycled - reference).abs().max().item() < TOL * scale
    del upcycled
    assert (mlc_logits(out, ids) - reference).abs().max().item() < TOL * scale
