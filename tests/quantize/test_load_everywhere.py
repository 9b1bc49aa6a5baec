"""Every scheme's output opens correctly in transformers, or transformers refuses it: never a silently random model.

The reference is transformers' own full-precision model with each quantised Linear's weight replaced by the
weight mlc dequantises from the files (and the other tensors by the files', which AWQ changes: its norms), so
the check is that transformers reads the files as mlc wrote them.
vLLM is not installed here: its loaders' rules are applied statically (tests/quantize/vllm_rules.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.quantize.conftest import SCHEMES
from tests.quantize.vllm_rules import vllm_verdict

IDS = torch.arange(40).view(2, 20) * 37 % 2048

# What transformers (with compressed-tensors and bitsandbytes installed) does with each scheme's output.
TRANSFORMERS = {
    "int8": "logits", "int4": "logits", "nf4": "logits", "fp4": "logits", "fp8": "logits",
    "gptq": "logits", "gptq-int8": "logits", "awq": "logits", "mixed": "logits",
    # compressed-tensors packs asymmetric zero points along the output dimension (its own compressor and
    # vLLM agree); transformers 5.25 sizes them unpacked and refuses the size mismatch.
    "int4-asym": "raises",
    # mlc's own layout carries no quant_method, so transformers refuses it.
    "llm-int8": "raises", "daq": "raises",
}


def _scheme_of(name: str) -> str:
    return {"int4-asym": "int4", "gptq-int8": "gptq"}.get(name, name)


def test_every_registered_scheme_is_covered():
    from mlc import plugins

    # q4_k_m writes GGUF only (tests/quantize/test_kquants.py): no HF layout for transformers to load.
    registered = set(plugins.available("quant_schemes")) - {"q4_k_m"}
    assert registered <= {_scheme_of(n) for n in SCHEMES}
    assert set(SCHEMES) == set(TRANSFORMERS)


def _expected_logits(src, quant_dir, ids: torch.Tensor = IDS) -> torch.Tensor:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mlc.models import load_model
    from mlc.models.quant_load import quant_modules

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    state = {f"{name}.weight": m.dequantize(torch.float32) for name, m in quant_modules(load_model(quant_dir, dtype=torch.float32)).items()}
    names = set(model.state_dict())
    for f in quant_dir.glob("*.safetensors"):
        state |= {n: t.float() for n, t in load_file(f).items() if n in names and n not in state}
    missing = set(state) - names
    assert not missing
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", list(SCHEMES))
def test_transformers_loads_each_scheme_with_the_written_weights_or_refuses_it(outputs, small_model_dir, name):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    out, _ = outputs[name]
    if TRANSFORMERS[name] == "raises":
        with pytest.raises((ValueError, RuntimeError), match="quant_method|size mismatch|mismatched"):
            AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        return
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = _expected_logits(small_model_dir, out)
    with torch.no_grad():
        got = hf(IDS).logits
        original = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32).eval()(IDS).logits
    error = (got - expected).abs().max().item()
    # bitsandbytes' CPU kernel computes in bf16 (activations and absmax) on AVX512-BF16 CPUs like this one.
    tolerance = 0.03 if name in ("nf4", "fp4") else 1e-3
    assert error < tolerance * expected.abs().max().item()
    assert error < 0.2 * (original - expected).abs().max().item()  # far closer than the quantisation moved the logits


@pytest.mark.parametrize("name", list(SCHEMES))
def test_vllm_would_load_each_scheme_or_refuse_it_never_misread_it(outputs, name):
    from safetensors import safe_open

    from mlc.commands.quantize.quantize import meta_model
    from mlc.models.quant_load import linear_names

    out, _ = outputs[name]
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    tensors = set()
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            tensors |= set(st.keys())
    verdict = vllm_verdict(qconfig, linear_names(meta_model(out)), tensors)
    assert not verdict.startswith("misreads"), verdict
    assert verdict.startswith("raises") == (TRANSFORMERS[name] == "raises" and name != "int4-asym"), verdict


def test_the_vllm_rules_catch_fused_shards_in_different_groups_and_half_quantised_layers():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    w = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    groups = {"a": {"targets": ["re:.*q_proj$"], "weights": w, "format": "pack-quantized"},
              "b": {"targets": ["re:.*(k|v)_proj$"], "weights": {**w, "num_bits": 8}, "format": "pack-quantized"}}
    assert vllm_verdict({"quant_method": "compressed-tensors", "config_groups": groups}, names, set()).startswith("misreads")
    one = {"a": {"targets": ["re:.*_proj$"], "weights": w, "format": "pack-quantized"}}
    assert vllm_verdict({"quant_method": "compressed-tensors", "config_groups": one}, names, set()) == "loads"
    half = {"model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"}
    assert vllm_verdict({"quant_method": "bitsandbytes", "load_in_4bit": True}, names, half).startswith("misreads")
    assert vllm_verdict({"mlc": {}}, names, set()).startswith("raises")
