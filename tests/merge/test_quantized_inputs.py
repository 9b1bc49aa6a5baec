"""Quantised models merge as inputs: GGUF files and compressed-tensors directories are dequantised tensor by
tensor while merging, the reference being transformers' own loaders of those formats (its GGUF reader, its
compressed-tensors decompression), and the output records what each input was read as."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from .tiny import load


def dense_state(model_dir: Path, **kwargs) -> dict[str, torch.Tensor]:
    """The weights transformers loads (dequantised), under HF names, in float32."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = model_dir / "config.json"
    if config.is_file() and "quantization_config" in json.loads(config.read_text()):
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)  # decompress into dense Linears
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def merge(run_mlc, tmp_path: Path, models: list[str], name: str) -> Path:
    config = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 0.5}} for m in models], "dtype": "float32"}
    (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(config))
    out = tmp_path / name
    code, _, err = run_mlc("merge", tmp_path / f"{name}.yml", "--out", out)
    assert code == 0, err
    return out


def merged_from(run_mlc, out: Path) -> list[dict[str, str]]:
    runs = sorted(Path(run_mlc.runs_dir).glob("*-merge-*"))
    run = json.loads((runs[-1] / "run.json").read_text())
    assert run["summary"]["out"] == str(out.absolute())
    return run["summary"]["merged_from"]


def tiny_with_tokenizer(root: Path, seed: int, tokenizer_dir: Path) -> Path:
    """A tiny Llama with SmolLM2's vocabulary size and tokenizer files (what a GGUF export needs)."""
    import shutil

    from mlc.io.hfdir import TOKENIZER_FILES
    from tests.conftest import save_tiny_hf_model

    out = save_tiny_hf_model("llama", root / "m", seed=seed, vocab_size=49152)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return tiny_with_tokenizer(tmp_path_factory.mktemp("dense"), 1, smollm2_dir)


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return tiny_with_tokenizer(tmp_path_factory.mktemp("other"), 2, smollm2_dir)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int4", "fp8"])
def test_a_compressed_tensors_input_is_dequantised_as_transformers_reads_it(scheme, dense, other, run_mlc, tmp_path):
    quantized = tmp_path / f"q-{scheme}"
    code, _, err = run_mlc("quantize", other, "--scheme", scheme, "--out", quantized, "--no-eval")
    assert code == 0, err
    out = merge(run_mlc, tmp_path, [str(dense), str(quantized)], f"merged-{scheme}")
    got = load(out)
    a, b = dense_state(dense), dense_state(quantized)
    assert sorted(got) == sorted(k for k in a if k != "lm_head.weight" or k in got)
    for name, t in got.items():
        assert torch.allclose(t, 0.5 * a[name] + 0.5 * b[name], atol=1e-6, rtol=0), name
    q = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(b[q], dense_state(other)[q], atol=1e-4)  # the input really was quantised
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # the merge is dense
    sources = {Path(m["model"]).name: m["read_as"] for m in merged_from(run_mlc, out)}
    assert sources["m"] == "hf" and sources[quantized.name].startswith("compressed-tensors") and "dequantised" in sources[quantized.name]


@pytest.mark.slow
def test_a_gguf_file_is_an_input_dequantised_as_transformers_reads_it(dense, other, run_mlc, tmp_path):
    gguf_dir = tmp_path / "gguf"
    code, _, err = run_mlc("checkpoint", "convert", other, "--to", "gguf", "--quant", "Q8_0", "--out", gguf_dir)
    assert code == 0, err
    gguf = next(gguf_dir.glob("*.gguf"))
    out = merge(run_mlc, tmp_path, [str(gguf), str(dense)], "merged-gguf")
    got = load(out)
    a, b = dense_state(dense), dense_state(gguf_dir, gguf_file=gguf.name)
    for name, t in got.items():
        assert torch.allclose(t, 0.5 * a[name] + 0.5 * b[name], atol=1e-6, rtol=0), name
    q = "model.layers.1.self_attn.q_proj.weight"
    assert 0 < float((b[q] - dense_state(other)[q]).abs().max()) < 0.01  # Q8_0: close to the original, not equal
    sources = {Path(m["model"]).name: m["read_as"] for m in merged_from(run_mlc, out)}
    assert sources[gguf.name] == "gguf Q8_0 (dequantised)"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"]  # the tokenizer came along
