"""Experts from several fine-tunes of the base (UpIT, mergekit-moe), with the shared weights from the
base or from a merge of the sources through an `mlc merge` method plugin."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from mlc.commands.upcycle.layout import DENSE_MLP, expert_name

from .upcycle_helpers import hf_logits, mlc_logits, token_batch, upcycle


def weights(path):
    return load_file(str(path / "model.safetensors"))


def test_expert_i_copies_source_i_mod_s_and_the_rest_comes_from_the_base(tiny_llama, finetunes, tmp_path, runs_root):
    out = upcycle(tiny_llama, tmp_path / "moe", experts=4, top_k=2, expert_sources=[str(f) for f in finetunes])
    base, moe, sources = weights(tiny_llama), weights(out), [weights(f) for f in finetunes]
    for name, tensor in base.items():
        mlp = DENSE_MLP.match(name)
        if mlp is None:
            assert torch.equal(moe[name], tensor), name
            continue
        layer, proj = int(mlp.group(1)), mlp.group(2)
        for e in range(4):
            assert torch.equal(moe[expert_name("mixtral", layer, e, proj)], sources[e % 2][name])
    ids = token_batch()
    assert (mlc_logits(out, ids) - hf_logits(out, ids)).abs().max().item() < 1e-5  # loads and agrees in both


def test_shared_merge_linear_averages_the_sources(tiny_llama, finetunes, tmp_path, runs_root):
    out = upcycle(
        tiny_llama, tmp_path / "moe", experts=2, top_k=1, shared_expert=True,
        expert_sources=[str(f) for f in finetunes], shared_merge="linear",
    )
    moe, (a, b) = weights(out), [weights(f) for f in finetunes]
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "model.norm.weight"):
        assert torch.allclose(moe[name], (a[name] + b[name]) / 2, atol=1e-7), name
    # the shared expert is the shared (merged) dense MLP; routed experts are the sources' own, halved on down
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(moe["model.layers.0.mlp.shared_expert.up_proj.weight"], (a[name] + b[name]) / 2, atol=1e-7)
    assert torch.equal(moe[expert_name("qwen2_moe", 0, 1, "up")], b[name])
    down = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(moe[expert_name("qwen2_moe", 0, 0, "down")], a[down] * 0.5)
    provenance = json.loads((out / "mlc-provenance.json").read_text())
    assert provenance["meta"]["shared_merge"] == {"method": "linear", "params": {"weight": 0.5}}


def test_shared_merge_with_a_base_method_adds_weighted_task_vectors(tiny_llama, finetunes, tmp_path, runs_root):
    out = upcycle(
        tiny_llama, tmp_path / "moe", experts=2, top_k=2, expert_sources=[str(f) for f in finetunes],
        shared_merge="task_arithmetic", merge_params=["weight=0.7,0.2"],
    )
    moe, base, (a, b) = weights(out), weights(tiny_llama), [weights(f) for f in finetunes]
    name = "model.layers.0.self_attn.o_proj.weight"
    expected = base[name] + 0.7 * (a[name] - base[name]) + 0.2 * (b[name] - base[name])
    assert torch.allclose(moe[name], expected, atol=1e-6)
    assert not torch.allclose(moe[name], base[name], atol=1e-3)
