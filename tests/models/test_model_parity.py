"""The native model computes what transformers computes, for every supported architecture."""

from __future__ import annotations

import pytest
import torch

from mlc.errors import InputError
from mlc.models import KVCache, build_model, config_from_hf, load_model, save_model

ARCHS = ["llama", "llama3", "llama_tied_bias_linear", "mistral", "qwen2", "mixtral", "qwen2_moe"]  # tests/conftest.py TINY_CONFIGS


def _hf(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _ids(batch=2, seq=20, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers_in_fp32(arch, tiny_hf_model):
    path = tiny_hf_model(arch)
    ids = _ids()
    with torch.no_grad():
        expected = _hf(path)(ids).logits
        got = load_model(path)(ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decoding_with_kv_cache_gives_the_full_forward_logits(arch, tiny_hf_model):
    path = tiny_hf_model(arch)
    ids = _ids()
    model = load_model(path)
    with torch.no_grad():
        expected = _hf(path)(ids).logits
        cache = KVCache(model.config, batch_size=2, max_length=32)
        # A 12-token prefill, a 3-token chunk (a masked prefill on top of a cache), then single tokens.
        parts = [model(ids[:, :12], cache=cache).logits, model(ids[:, 12:15], cache=cache).logits]
        parts += [model(ids[:, i : i + 1], cache=cache).logits for i in range(15, 20)]
    assert cache.length == 20
    assert (torch.cat(parts, dim=1) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_a_directory_saved_by_mlc_loads_in_transformers_with_identical_logits(arch, tiny_hf_model, tmp_path):
    path = tiny_hf_model(arch)
    model = load_model(path)
    out = save_model(model, tmp_path / "saved")
    ids = _ids()
    with torch.no_grad():
        reloaded = _hf(out)
        assert type(reloaded).__name__ == model.config.architecture
        got = reloaded(ids).logits
        # Saving loses nothing: transformers computes the same bits from mlc's directory as from the original. (mlc's
        # own logits differ from transformers' by float rounding only, 1e-4 at most: test_logits_match_transformers;
        # bit equality of those two holds on some CPUs and not others, e.g. Mixtral's experts on an AMD EPYC.)
        assert torch.equal(got, _hf(path)(ids).logits)
        assert (got - model(ids).logits).abs().max().item() <= 1e-4


def test_state_dict_keys_are_the_checkpoint_tensor_names(tiny_hf_model):
    from safetensors import safe_open

    for arch in ("mixtral", "qwen2_moe", "llama_tied_bias_linear"):
        path = tiny_hf_model(arch)
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            on_disk = set(f.keys())
        model = load_model(path)
        keys = set(model.state_dict())
        if model.config.tie_word_embeddings:
            keys.discard("lm_head.weight")
        assert keys == on_disk
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in load_model(tiny_hf_model("mixtral")).state_dict()
    qwen = load_model(tiny_hf_model("qwen2_moe")).state_dict()
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in qwen
    assert "model.layers.1.mlp.gate_proj.weight" in qwen  # mlp_only_layers=[1] keeps layer 1 dense


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_router_logits_and_hidden_states_match_transformers(arch, tiny_hf_model):
    path = tiny_hf_model(arch)
    ids = _ids(batch=1, seq=10)
    with torch.no_grad():
        ref = _hf(path)(ids, output_router_logits=True, output_hidden_states=True)
        out = load_model(path)(ids, output_router_logits=True, output_hidden_states=True)
    ref_routers = [r for r in ref.router_logits if r is not None]
    assert len(out.router_logits) == len(ref_routers) == (3 if arch == "mixtral" else 2)
    for got, want in zip(out.router_logits, ref_routers):
        assert (got - want.reshape(got.shape)).abs().max().item() <= 1e-5
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for got, want in zip(out.hidden_states, ref.hidden_states):
        assert (got - want).abs().max().item() <= 1e-5


def test_sliding_window_masks_keys_older_than_the_window(tiny_hf_model):
    path = tiny_hf_model("mistral")  # window 8, 20 tokens
    ids = _ids()
    model = load_model(path)
    with torch.no_grad():
        windowed = model(ids).logits
        model_full = load_model(path)
        for layer in model_full.model.layers:
            layer.self_attn.window = None
        full = model_full(ids).logits
    # Inside the window nothing changes; beyond it the masked keys matter.
    assert torch.allclose(windowed[:, :8], full[:, :8], atol=1e-6)
    assert (windowed[:, 8:] - full[:, 8:]).abs().max().item() > 1e-3


def test_bf16_logits_stay_close_to_transformers_bf16(tiny_hf_model):
    path = tiny_hf_model("llama")
    ids = _ids()
    with torch.no_grad():
        expected = _hf(path, torch.bfloat16)(ids).logits.float()
        got = load_model(path, dtype="bf16")(ids).logits.float()
        fp32 = load_model(path)(ids).logits
    assert got.dtype == torch.float32 and load_model(path, dtype="bf16").lm_head.weight.dtype == torch.bfloat16
    assert (got - expected).abs().max().item() <= 0.02
    assert (got - fp32).abs().max().item() > 0  # really ran in bf16


@pytest.mark.parametrize("rope_scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
])
def test_rope_frequencies_match_transformers(rope_scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mlc.models.rope import inverse_frequencies

    hf_cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, rope_scaling=rope_scaling)
    if rope_scaling is None:
        expected = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope_scaling["rope_type"]](hf_cfg, "cpu")
    assert torch.equal(inverse_frequencies(128, 500000.0, rope_scaling), expected)


def test_an_unsupported_architecture_is_named_with_the_supported_ones():
    with pytest.raises(InputError) as e:
        config_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64})
    assert "GPT2LMHeadModel" in e.value.message
    assert "LlamaForCausalLM" in e.value.hint and "MixtralForCausalLM" in e.value.hint and "Qwen2MoeForCausalLM" in e.value.hint


def test_an_unsupported_rope_scaling_is_refused():
    raw = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(InputError, match="yarn"):
        build_model(raw)
