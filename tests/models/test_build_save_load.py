"""Building random models, saving complete HF directories, loading them back in any dtype."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mlc.errors import InputError
from mlc.models import build_model, load_model, save_model

TINY = {
    "model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2,
}


def test_build_model_is_deterministic_per_seed_and_initialises_like_transformers():
    a, b, c = build_model(TINY, seed=3), build_model(TINY, seed=3), build_model(TINY, seed=4)
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.weight, c.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(a.model.norm.weight, torch.ones(32))
    std = a.model.layers[0].mlp.up_proj.weight.std().item()
    assert 0.015 < std < 0.025  # initializer_range 0.02
    assert a.lm_head.weight is a.model.embed_tokens.weight


def test_save_model_writes_a_complete_directory_that_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model(TINY, seed=0)
    out = save_model(model, tmp_path / "m", dtype="bf16")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["torch_dtype"] == "bfloat16"
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: stored once, as transformers does
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
        got = load_model(out, dtype="float32")(ids).logits
    assert torch.equal(got, expected)
    assert load_model(out).lm_head.weight.dtype == torch.bfloat16  # default: the stored dtype


def test_tokenizer_files_travel_with_a_saved_model(smollm2_dir, tmp_path):
    small = build_model({**TINY, "vocab_size": 49152}, seed=0)
    out = save_model(small, tmp_path / "m", tokenizer_from=smollm2_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).read_bytes() == (smollm2_dir / name).read_bytes()
    again = save_model(load_model(out), tmp_path / "again")  # the loaded model remembers its source directory
    assert (again / "tokenizer.json").is_file()


def test_weights_that_do_not_fit_the_config_are_refused_with_the_tensor_named(tmp_path):
    model = build_model(TINY, seed=0)
    out = save_model(model, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(InputError, match="tensors missing .*model.layers.2"):
        load_model(out)
    (out / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(InputError, match="gate_proj.weight has shape"):
        load_model(out)
