"""`mlc quantize --format gguf`: one GGUF file holding mlc's own integers, which gguf-py reads back and llama.cpp runs.

References: gguf-py's own dequantiser and tensor-name map (not the writer's tables), the same settings written in the
HF layout and dequantised by mlc, and transformers running those weights (for llama.cpp's logits).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.checkpoint.test_checkpoint_convert import _llama_cpp_permute

IDS = [(i * 37) % 2048 for i in range(20)]


@pytest.fixture(scope="module")
def gguf_outputs(small_model_dir, tmp_path_factory, run_mlc_module):
    """int4 g32 and int8, as GGUF files, made with the flags of the HF outputs of the same name (round to nearest: the same integers)."""
    from tests.quantize.conftest import SCHEMES

    made = {}
    for name in ("int4", "int8"):
        out = tmp_path_factory.mktemp("gguf") / name
        code, stdout, stderr = run_mlc_module("quantize", small_model_dir, "--scheme", name, "--format", "gguf", "--out", out, "--json", *SCHEMES[name])
        assert code == 0, stderr
        made[name] = (out, json.loads(stdout))
    return made


@pytest.mark.parametrize("name,ggml", [("int4", "Q4_0"), ("int8", "Q8_0")])
def test_the_gguf_file_holds_exactly_the_weights_of_the_hf_output(gguf_outputs, outputs, name, ggml):
    import gguf
    from gguf.quants import dequantize

    from mlc.io.hfdir import read_config
    from mlc.models import load_model
    from mlc.models.quant_load import quant_modules

    out, report = gguf_outputs[name]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("mlc-")) == ["model.gguf"]
    assert report["size_bytes"] == (out / "model.gguf").stat().st_size and report["format"] == "gguf"
    hf_dir, _ = outputs[name]
    config = read_config(hf_dir)
    expected = {n: m.dequantize(torch.float32) for n, m in quant_modules(load_model(hf_dir, dtype=torch.float32)).items()}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    reader = gguf.GGUFReader(out / "model.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert int(reader.fields["general.file_type"].contents()) == {"Q4_0": 2, "Q8_0": 7}[ggml]
    for layer, w in expected.items():
        t = tensors[names.get_name(layer) + ".weight"]
        assert t.tensor_type.name == ggml, layer
        got = dequantize(t.data, t.tensor_type).reshape(w.shape)
        want = w.numpy()
        if layer.endswith(("q_proj", "k_proj")):  # llama.cpp's RoPE row order
            want = _llama_cpp_permute(want, config["num_attention_heads" if layer.endswith("q_proj") else "num_key_value_heads"])
        assert np.array_equal(got, want), layer  # mlc's bf16 scales are exact in fp16, its integers are the blocks'
    assert tensors["token_embd.weight"].tensor_type.name == "F16"


def _llama_cpp_logits(gguf_file) -> torch.Tensor:
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def without_repacking():
        # ggml's AMX matmul (an "extra buffer type" that repacks Q4_0/Q8_0 weights) crashes in this VM, whose CPU
        # reports AMX (benchmarks/serve_vs_peers.py builds llama.cpp without it); llama.cpp's --no-repack does this.
        params = default()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without_repacking
    try:
        llm = llama_cpp.Llama(str(gguf_file), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    finally:
        lib.llama_model_default_params = default
    llm.eval(IDS)
    return torch.tensor(np.array(llm.scores[: len(IDS)]))


@pytest.mark.slow
def test_llama_cpp_runs_the_int4_gguf_with_the_logits_of_its_weights(gguf_outputs, outputs, small_model_dir):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from tests.quantize.test_load_everywhere import _expected_logits

    got = _llama_cpp_logits(gguf_outputs["int4"][0] / "model.gguf")
    ids = torch.tensor([IDS])
    expected = _expected_logits(small_model_dir, outputs["int4"][0], ids)[0]
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32).eval()(ids).logits[0]
    error = (got - expected).abs().max().item()
    # llama.cpp rounds the activations to Q8_0 for its Q4_0 dot products and keeps the embeddings in F16:
    # 0.026 here, against the 0.44 that quantising the weights moved the logits.
    assert error < 0.1 * (original - expected).abs().max().item()


@pytest.mark.parametrize("flags", [["--scheme", "nf4"], ["--scheme", "int4", "--asymmetric"], ["--scheme", "llm-int8"]])
def test_what_gguf_cannot_hold_exactly_is_refused_before_any_work(run_mlc_module, small_model_dir, tmp_path, flags):
    code, _, err = run_mlc_module("quantize", small_model_dir, *flags, "--format", "gguf", "--out", tmp_path / "g")
    assert code == 2 and "gguf" in err.lower()
    assert not (tmp_path / "g").exists()
