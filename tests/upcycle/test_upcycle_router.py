"""Router initialisation (random, hidden, cheap_embed) and routing (topk-softmax, softmax-topk with
Megatron's scale), checked against transformers and hand computations."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer

from mlc.commands.upcycle.layout import expert_name, router_name
from mlc.commands.upcycle.router import softmax_topk_scale

from .upcycle_helpers import upcycle


def prompt_table(path):
    return yaml.safe_load(path.read_text())["experts"]


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def test_random_router_is_seeded_normal_with_std_0_02(tiny_llama, tmp_path, runs_root):
    a = load_file(str(upcycle(tiny_llama, tmp_path / "a", experts=8, top_k=2, seed=1) / "model.safetensors"))
    b = load_file(str(upcycle(tiny_llama, tmp_path / "b", experts=8, top_k=2, seed=1) / "model.safetensors"))
    c = load_file(str(upcycle(tiny_llama, tmp_path / "c", experts=8, top_k=2, seed=2) / "model.safetensors"))
    r0, r1 = a[router_name("mixtral", 0)], a[router_name("mixtral", 1)]
    assert r0.shape == (8, 32)
    assert torch.equal(r0, b[router_name("mixtral", 0)])
    assert not torch.equal(r0, c[router_name("mixtral", 0)])
    assert not torch.equal(r0, r1)  # each layer gets its own draw
    both = torch.cat([r0, r1]).flatten()  # 512 draws
    assert abs(both.mean().item()) < 4 * 0.02 / 512**0.5
    assert abs(both.std().item() - 0.02) < 0.003


def reference_hidden_router(base, table) -> list[torch.Tensor]:
    """Rows from transformers' LlamaForCausalLM: the post-attention-norm output (the router's input) at
    the last token, averaged over positive prompts, minus that of negative ones, unit length."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    bos = tok.token_to_id("<s>")
    seen = {}
    for i, layer in enumerate(model.model.layers):
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[0, -1]))

    def mean_state(texts):
        states = []
        for t in texts:
            ids = [bos] + tok.encode(t, add_special_tokens=False).ids
            with torch.no_grad():
                model(torch.tensor([ids]))
            states.append(torch.stack([seen[i] for i in range(len(model.model.layers))]))
        return torch.stack(states).mean(0)

    rows = []
    for entry in table:
        v = mean_state(entry["positive"])
        if entry.get("negative"):
            v = v - mean_state(entry["negative"])
        rows.append(v)
    rows = torch.stack(rows)  # (experts, layers, hidden)
    return [torch.stack([unit(r) for r in rows[:, i]]) for i in range(rows.shape[1])]


def test_hidden_router_rows_are_the_prompts_mean_router_inputs(tiny_llama, prompts_file, tmp_path, runs_root):
    out = upcycle(tiny_llama, tmp_path / "moe", experts=4, top_k=2, router="hidden", expert_prompts=str(prompts_file))
    got = load_file(str(out / "model.safetensors"))
    expected = reference_hidden_router(tiny_llama, prompt_table(prompts_file))
    for layer in range(2):
        assert torch.allclose(got[router_name("mixtral", layer)], expected[layer], atol=1e-5)
    # the rows differ between experts and layers: the prompts steer them
    assert not torch.allclose(expected[0][0], expected[0][1], atol=1e-2)


def test_cheap_embed_router_is_the_mean_prompt_embedding_for_every_layer(tiny_llama, prompts_file, tmp_path, runs_root):
    out = upcycle(tiny_llama, tmp_path / "moe", experts=4, top_k=2, router="cheap_embed", expert_prompts=str(prompts_file))
    got = load_file(str(out / "model.safetensors"))
    embed = load_file(str(tiny_llama / "model.safetensors"))["model.embed_tokens.weight"]
    tok = Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))

    def mean_embedding(texts):
        return torch.stack([embed[tok.encode(t, add_special_tokens=False).ids].mean(0) for t in texts]).mean(0)

    rows = []
    for entry in prompt_table(prompts_file):
        v = mean_embedding(entry["positive"])
        if entry.get("negative"):
            v = v - mean_embedding(entry["negative"])
        rows.append(unit(v))
    expected = torch.stack(rows)
    for layer in range(2):
        assert torch.allclose(got[router_name("mixtral", layer)], expected, atol=1e-6)


def test_topk_softmax_is_renormalised_and_softmax_topk_is_not(tiny_llama, tmp_path, runs_root):
    renorm = json.loads((upcycle(tiny_llama, tmp_path / "a", shared_expert=True) / "config.json").read_text())
    raw = json.loads((upcycle(tiny_llama, tmp_path / "b", shared_expert=True, routing="softmax-topk") / "config.json").read_text())
    assert renorm["norm_topk_prob"] is True and raw["norm_topk_prob"] is False


def test_megatron_scale_is_the_cube_root_of_e_g2_over_k():
    assert softmax_topk_scale(8, 2) == pytest.approx(1.5874, abs=1e-4)  # 4^(1/3), as in PAPERS.md
    assert softmax_topk_scale(8, 2, granularity=2) == pytest.approx(16 ** (1 / 3))
    assert softmax_topk_scale(4, 4) == pytest.approx(1.0)


def test_softmax_topk_experts_are_scaled_copies_that_restore_the_dense_magnitude(tiny_llama, tmp_path, runs_root):
    import transformers

    experts, k = 8, 2
    out = upcycle(tiny_llama, tmp_path / "moe", experts=experts, top_k=k, shared_expert=True, routing="softmax-topk")
    dense = load_file(str(tiny_llama / "model.safetensors"))
    moe = load_file(str(out / "model.safetensors"))
    s = softmax_topk_scale(experts, k)
    for proj, factor in (("gate", s), ("up", s), ("down", 0.5 * s)):  # down also carries the shared-expert half
        d = dense[f"model.layers.0.mlp.{proj}_proj.weight"]
        assert torch.allclose(moe[expert_name("qwen2_moe", 0, 5, proj)], d * factor, rtol=1e-6, atol=0)
    # The routed half of the MoE block against the dense MLP's half, on the layer's real inputs: the scale
    # brings k/E of the output back to about 1 (without it the ratio would be k/E = 0.25).
    dense_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    moe_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        block = moe_model.model.layers[0].mlp
        shared = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        routed = block(x[None])[0] - shared
        half_dense = 0.5 * dense_model.model.layers[0].mlp(x)
    ratio = routed.norm() / half_dense.norm()
    # SiLU is only roughly homogeneous (silu(s*a) > s*silu(a) near 0), so the match is approximate (1.23 here)
    assert 0.75 < ratio.item() < 1.5
