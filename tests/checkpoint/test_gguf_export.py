"""GGUF export: files the `gguf` package reads, that transformers (and llama.cpp, when installed) run with the expected logits.

The reference for each type is the original weights passed through gguf-py's own quantise/dequantise (or a
plain cast for F16/BF16), loaded into transformers: an exported file must hold exactly that, in llama.cpp's
tensor names and its RoPE row order (transformers undoes the permutation when it reads the file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.checkpoint.conftest import safetensors_state

IDS = torch.randint(0, 2000, (1, 20), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def trained_hf(train_run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model mlc trained, with its real byte-level BPE tokenizer, as an HF directory."""
    from mlc.cli import main

    out = tmp_path_factory.mktemp("trained") / "hf"
    try:
        main(["--runs-dir", str(out.parent / "runs"), "checkpoint", "convert", str(train_run_dir / "checkpoints" / "step-00000004"), "--to", "hf", "--out", str(out)])
    except SystemExit as e:
        assert e.code in (0, None)
    return out


def expected_weights(src: Path, quant: str) -> dict[str, torch.Tensor]:
    import gguf
    from gguf.quants import dequantize, quantize

    out = {}
    for name, w in safetensors_state(src).items():
        if w.ndim < 2 or quant == "F32":
            out[name] = w.float()
        elif quant in ("Q8_0", "Q4_0"):
            qt = gguf.GGMLQuantizationType[quant]
            out[name] = torch.from_numpy(dequantize(quantize(w.float().numpy(), qt), qt).copy()).reshape(w.shape)
        else:
            out[name] = w.to(torch.float16 if quant == "F16" else torch.bfloat16).float()
    return out


def logits_with(src: Path, state: dict[str, torch.Tensor]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize("quant", ["F32", "F16", "BF16", "Q8_0", "Q4_0"])
def test_an_exported_gguf_holds_the_quantised_weights_transformers_runs(quant, trained_hf, tmp_path, run_mlc):
    import gguf
    from transformers import AutoModelForCausalLM

    code, _, err = run_mlc("checkpoint", "convert", trained_hf, "--to", "gguf", "--quant", quant, "--out", tmp_path / "g")
    assert code == 0, err
    file = tmp_path / "g" / "model.gguf"
    reader = gguf.GGUFReader(file)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_down.weight"] == quant
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="model.gguf", dtype=torch.float32).eval()(IDS).logits
    expected = logits_with(trained_hf, expected_weights(trained_hf, quant))
    assert (got - expected).abs().max().item() < 1e-4
    if quant == "F32":
        assert torch.equal(got, logits_with(trained_hf, safetensors_state(trained_hf)))


def test_gguf_to_hf_to_gguf_keeps_the_tokenizer_llama_cpp_needs(trained_hf, tmp_path, run_mlc):
    import gguf

    assert run_mlc("checkpoint", "convert", trained_hf, "--to", "gguf", "--quant", "F32", "--out", tmp_path / "a")[0] == 0
    assert run_mlc("checkpoint", "convert", tmp_path / "a", "--to", "hf", "--out", tmp_path / "hf")[0] == 0
    assert run_mlc("checkpoint", "convert", tmp_path / "hf", "--to", "gguf", "--quant", "F32", "--out", tmp_path / "b")[0] == 0
    a, b = gguf.GGUFReader(tmp_path / "a" / "model.gguf"), gguf.GGUFReader(tmp_path / "b" / "model.gguf")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.eos_token_id"):
        assert a.fields[key].contents() == b.fields[key].contents(), key
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.name == tb.name and np.array_equal(ta.data, tb.data), ta.name


def test_k_quants_are_refused_with_the_way_to_get_them(trained_hf, tmp_path, run_mlc):
    code, _, err = run_mlc("checkpoint", "convert", trained_hf, "--to", "gguf", "--quant", "Q4_K", "--out", tmp_path / "g")
    assert code == 2 and "llama-quantize" in err and not (tmp_path / "g").exists()


@pytest.mark.slow
def test_llama_cpp_runs_the_exported_gguf_with_transformers_logits(trained_hf, tmp_path, run_mlc):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    assert run_mlc("checkpoint", "convert", trained_hf, "--to", "gguf", "--quant", "F32", "--out", tmp_path / "g")[0] == 0
    llm = llama_cpp.Llama(str(tmp_path / "g" / "model.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    tokens = IDS[0].tolist()
    llm.eval(tokens)
    got = torch.tensor(np.array(llm.scores[: len(tokens)]))
    expected = logits_with(trained_hf, safetensors_state(trained_hf))[0]
    assert (got - expected).abs().max().item() < 1e-3 * max(1.0, expected.abs().max().item())
    # The vocabulary round-trips: llama.cpp tokenises like the HF tokenizer.
    from tokenizers import Tokenizer

    text = "The cat sat on the mat 123."
    assert llm.tokenize(text.encode(), add_bos=False) == Tokenizer.from_file(str(trained_hf / "tokenizer.json")).encode(text).ids


@pytest.mark.slow
@pytest.mark.realmodel
def test_smollm2_exports_to_gguf_q8_0_that_transformers_runs(smollm2_dir, tmp_path, run_mlc):
    from transformers import AutoModelForCausalLM

    code, _, err = run_mlc("checkpoint", "convert", smollm2_dir, "--to", "gguf", "--quant", "Q8_0", "--out", tmp_path / "g")
    assert code == 0, err
    ids = torch.tensor([[1, 504, 2575, 282, 4649, 314, 260, 1345, 30, 378]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="model.gguf", dtype=torch.float32).eval()(ids).logits
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
        model.load_state_dict(expected_weights(smollm2_dir, "Q8_0"), strict=False)
        model.tie_weights()
        expected = model.eval()(ids).logits
    assert (got - expected).abs().max().item() < 1e-3
