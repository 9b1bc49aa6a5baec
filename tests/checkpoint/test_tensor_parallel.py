"""Foreign tensor-parallel shards: Megatron-style TP=4 shards of a tiny GQA Llama with a padded vocabulary -> universal
-> hf gives the original logits; universal -> TP=2 gives the shards Megatron would hold, and back.

The shards are cut here by hand, following Megatron-core's layout (not mlc's spec code): QKV interleaved per
query group and split by group, fc1 = [gate_r; up_r] per rank, row-parallel o_proj/fc2, vocabulary padded to a
multiple of 128 x TP.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.checkpoint.conftest import hf_logits, read_json, safetensors_state

CONFIG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=8, vocab_size=250)


def megatron_shards(hf: dict[str, torch.Tensor], tp: int, layers: int) -> list[dict[str, torch.Tensor]]:
    heads, groups, hd = CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"], CONFIG["head_dim"]
    per_group = heads // groups
    padded = -(-CONFIG["vocab_size"] // (128 * tp)) * 128 * tp
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, torch.zeros(padded - t.shape[0], t.shape[1])])

    for name, whole in (("embedding.word_embeddings.weight", hf["model.embed_tokens.weight"]), ("output_layer.weight", hf["lm_head.weight"])):
        for r, part in enumerate(pad(whole).chunk(tp)):
            ranks[r][name] = part.clone()
    for r in range(tp):
        ranks[r]["decoder.final_layernorm.weight"] = hf["model.norm.weight"].clone()
    for i in range(layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = hf[p + "self_attn.q_proj.weight"].reshape(groups, per_group * hd, -1)
        k = hf[p + "self_attn.k_proj.weight"].reshape(groups, hd, -1)
        v = hf[p + "self_attn.v_proj.weight"].reshape(groups, hd, -1)
        qkv = torch.cat([q, k, v], dim=1)  # (groups, [q heads of the group, k, v], hidden)
        gate, up = hf[p + "mlp.gate_proj.weight"].chunk(tp), hf[p + "mlp.up_proj.weight"].chunk(tp)
        for r in range(tp):
            ranks[r][m + "self_attention.linear_qkv.weight"] = qkv.chunk(tp)[r].reshape(-1, qkv.shape[-1]).clone()
            ranks[r][m + "self_attention.linear_qkv.layer_norm_weight"] = hf[p + "input_layernorm.weight"].clone()
            ranks[r][m + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"].chunk(tp, dim=1)[r].clone()
            ranks[r][m + "mlp.linear_fc1.layer_norm_weight"] = hf[p + "post_attention_layernorm.weight"].clone()
            ranks[r][m + "mlp.linear_fc1.weight"] = torch.cat([gate[r], up[r]]).clone()
            ranks[r][m + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"].chunk(tp, dim=1)[r].clone()
    return ranks


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import save_tiny_hf_model

    return save_tiny_hf_model("llama", tmp_path_factory.mktemp("gqa"), **CONFIG)


def write_shards(ranks: list[dict[str, torch.Tensor]], out: Path) -> Path:
    for r, state in enumerate(ranks):
        (out / f"mp_rank_{r:02d}").mkdir(parents=True)
        torch.save({"model": state}, out / f"mp_rank_{r:02d}" / "model_optim_rng.pt")
    return out


def test_megatron_tp4_shards_go_through_universal_to_hf_with_the_original_logits(tiny_gqa, tmp_path, run_mlc):
    original = safetensors_state(tiny_gqa)
    shards = write_shards(megatron_shards(original, 4, CONFIG["num_hidden_layers"]), tmp_path / "tp4")
    assert shards.joinpath("mp_rank_00/model_optim_rng.pt").is_file()
    code, _, err = run_mlc("checkpoint", "convert", shards, "--to", "universal", "--out", tmp_path / "uni", "--spec", "megatron-llama", "--config", tiny_gqa)
    assert code == 0, err
    params = read_json(tmp_path / "uni" / "universal.json")["params"]
    assert params["model.embed_tokens.weight"]["shape"] == [250, 64]  # the 512-row padding is stripped
    code, _, err = run_mlc("checkpoint", "convert", tmp_path / "uni", "--to", "hf", "--out", tmp_path / "hf")
    assert code == 0, err
    back = safetensors_state(tmp_path / "hf")
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf_logits(tmp_path / "hf", ids), hf_logits(tiny_gqa, ids))


def test_universal_cuts_into_the_tp2_shards_megatron_holds_and_back(tiny_gqa, tmp_path, run_mlc):
    original = safetensors_state(tiny_gqa)
    assert run_mlc("checkpoint", "convert", tiny_gqa, "--to", "universal", "--out", tmp_path / "uni")[0] == 0
    code, _, err = run_mlc("checkpoint", "convert", tmp_path / "uni", "--to", "tp", "--spec", "megatron-llama", "--tp", "2", "--out", tmp_path / "tp2")
    assert code == 0, err
    expected = megatron_shards(original, 2, CONFIG["num_hidden_layers"])
    for r in range(2):
        written = torch.load(tmp_path / "tp2" / f"mp_rank_{r:02d}" / "model_optim_rng.pt", weights_only=True)["model"]
        assert set(written) == set(expected[r])
        for k, v in expected[r].items():
            assert torch.equal(written[k], v), (r, k)
    # mlc-tp.json and config.json travel with the shards: no --spec or --config needed to come back.
    code, _, err = run_mlc("checkpoint", "convert", tmp_path / "tp2", "--to", "universal", "--out", tmp_path / "uni2")
    assert code == 0, err
    assert run_mlc("checkpoint", "convert", tmp_path / "uni2", "--to", "hf", "--out", tmp_path / "hf")[0] == 0
    back = safetensors_state(tmp_path / "hf")
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_optimizer_state_is_sharded_and_recombined_like_its_parameter(tiny_gqa, tmp_path, run_mlc):
    original = safetensors_state(tiny_gqa)
    ranks = megatron_shards(original, 2, CONFIG["num_hidden_layers"])
    moments = {k: v * 0.5 + 1 for k, v in original.items()}  # stand-in exp_avg: distinct values, same layout
    moment_ranks = megatron_shards(moments, 2, CONFIG["num_hidden_layers"])
    for r in range(2):
        (tmp_path / "tp" / f"mp_rank_{r:02d}").mkdir(parents=True)
        state = {"state": {k: {"exp_avg": moment_ranks[r][k]} for k in ranks[r]}}
        torch.save({"model": ranks[r], "optimizer": state}, tmp_path / "tp" / f"mp_rank_{r:02d}" / "model_optim_rng.pt")
    args = ("--spec", "megatron-llama", "--config", tiny_gqa, "--with-optimizer")
    code, _, err = run_mlc("checkpoint", "convert", tmp_path / "tp", "--to", "universal", "--out", tmp_path / "uni", *args)
    assert code == 0, err
    from safetensors.torch import load_file

    q = load_file(tmp_path / "uni" / "params" / "model.layers.1.self_attn.q_proj.weight.safetensors")
    assert torch.equal(q["weight"], original["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(q["exp_avg"], moments["model.layers.1.self_attn.q_proj.weight"])
    emb = load_file(tmp_path / "uni" / "params" / "model.embed_tokens.weight.safetensors")
    assert torch.equal(emb["exp_avg"], moments["model.embed_tokens.weight"])


def test_a_replicated_parameter_that_differs_between_ranks_is_refused(tiny_gqa, tmp_path, run_mlc):
    ranks = megatron_shards(safetensors_state(tiny_gqa), 2, CONFIG["num_hidden_layers"])
    ranks[1]["decoder.final_layernorm.weight"] = ranks[1]["decoder.final_layernorm.weight"] + 1
    write_shards(ranks, tmp_path / "tp")
    code, _, err = run_mlc("checkpoint", "convert", tmp_path / "tp", "--to", "hf", "--out", tmp_path / "o", "--spec", "megatron-llama", "--config", tiny_gqa)
    assert code == 1 and "differs between TP ranks 0 and 1" in err and not (tmp_path / "o").exists()


def test_a_parameter_no_rule_covers_is_named(tiny_gqa, tmp_path, run_mlc):
    ranks = megatron_shards(safetensors_state(tiny_gqa), 2, CONFIG["num_hidden_layers"])
    for r in ranks:
        r["decoder.layers.0.self_attention.linear_qkv.bias"] = torch.zeros(4)
    write_shards(ranks, tmp_path / "tp")
    code, _, err = run_mlc("checkpoint", "convert", tmp_path / "tp", "--to", "hf", "--out", tmp_path / "o", "--spec", "megatron-llama", "--config", tiny_gqa)
    assert code == 1 and "linear_qkv.bias" in err and "matches no rule" in err


def test_expert_parallel_shards_of_a_mixtral_recombine_with_global_expert_numbers(tmp_path, run_mlc):
    """TP=2 x EP=2: each expert-parallel rank holds 2 of the 4 experts as local_experts 0 and 1."""
    from tests.conftest import save_tiny_hf_model

    src = save_tiny_hf_model("mixtral", tmp_path / "mixtral")
    hf = safetensors_state(src)
    cfg = read_json(src / "config.json")
    layers, tp, ep, local = cfg["num_hidden_layers"], 2, 2, 2
    groups, hd = cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    per_group = cfg["num_attention_heads"] // groups
    padded = -(-cfg["vocab_size"] // (128 * tp)) * 128 * tp
    for e in range(ep):
        for r in range(tp):
            state = {}
            for name, whole in (("embedding.word_embeddings.weight", hf["model.embed_tokens.weight"]), ("output_layer.weight", hf["lm_head.weight"])):
                state[name] = torch.cat([whole, torch.zeros(padded - whole.shape[0], whole.shape[1])]).chunk(tp)[r].clone()
            state["decoder.final_layernorm.weight"] = hf["model.norm.weight"].clone()
            for i in range(layers):
                p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
                qkv = torch.cat([hf[p + "self_attn.q_proj.weight"].reshape(groups, per_group * hd, -1),
                                 hf[p + "self_attn.k_proj.weight"].reshape(groups, hd, -1),
                                 hf[p + "self_attn.v_proj.weight"].reshape(groups, hd, -1)], dim=1)
                state[m + "self_attention.linear_qkv.weight"] = qkv.chunk(tp)[r].reshape(-1, qkv.shape[-1]).clone()
                state[m + "self_attention.linear_qkv.layer_norm_weight"] = hf[p + "input_layernorm.weight"].clone()
                state[m + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"].chunk(tp, dim=1)[r].clone()
                state[m + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"].clone()
                state[m + "mlp.router.weight"] = hf[p + "block_sparse_moe.gate.weight"].clone()
                for j in range(local):
                    x = f"{p}block_sparse_moe.experts.{e * local + j}."
                    state[f"{m}mlp.experts.local_experts.{j}.linear_fc1.weight"] = torch.cat([hf[x + "w1.weight"].chunk(tp)[r], hf[x + "w3.weight"].chunk(tp)[r]]).clone()
                    state[f"{m}mlp.experts.local_experts.{j}.linear_fc2.weight"] = hf[x + "w2.weight"].chunk(tp, dim=1)[r].clone()
            (tmp_path / "tp" / f"mp_rank_{r:02d}_{e:03d}").mkdir(parents=True)
            torch.save({"model": state}, tmp_path / "tp" / f"mp_rank_{r:02d}_{e:03d}" / "model_optim_rng.pt")
    code, out, err = run_mlc("checkpoint", "convert", tmp_path / "tp", "--to", "hf", "--out", tmp_path / "hf", "--spec", "megatron-llama", "--config", src)
    assert code == 0, err
    back = safetensors_state(tmp_path / "hf")
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    ids = torch.randint(0, cfg["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf_logits(tmp_path / "hf", ids), hf_logits(src, ids))
