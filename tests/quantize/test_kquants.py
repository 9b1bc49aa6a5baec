"""`mlc quantize --scheme q4_k_m --format gguf`: llama.cpp's Q4_K_M mix, Q4_K and Q6_K blocks quantised by mlc.

References: gguf-py's own dequantisers (every Q4_K/Q6_K block, bit for bit), llama.cpp's own quantiser
(llama_model_quantize through llama-cpp-python, on an F32 export of the same weights) for which tensor gets which
type and for the Q5_0/Q8_0 fallbacks, llama.cpp running the file (its logits against transformers' on the
file's weights), and gguf-py's Q4_0 quantiser (the error Q4_K must beat).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.checkpoint.test_checkpoint_convert import _llama_cpp_permute

IDS = [(i * 37) % 2048 for i in range(20)]
Q4_K_M = 15  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M


def _model(tmp_path_factory, tied: bool):
    """Rows of 256 (whole super-blocks) everywhere but ffn_down (320: not, so it takes llama.cpp's fallback)."""
    from mlc.data import tiny_model_dir
    from mlc.io.hfdir import read_config
    from mlc.models import build_model, save_model

    config = read_config(tiny_model_dir()) | {"hidden_size": 256, "intermediate_size": 320, "head_dim": 64, "tie_word_embeddings": tied}
    model = build_model(config, seed=0, dtype=torch.float32)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.ndim == 2:
                p.normal_(0.0, 0.08 if name.endswith("proj.weight") else 0.5, generator=torch.Generator().manual_seed(i))
    return save_model(model, tmp_path_factory.mktemp("kq") / ("tied" if tied else "untied"), tokenizer_from=tiny_model_dir())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {tied: _model(tmp_path_factory, tied) for tied in (False, True)}


@pytest.fixture(scope="module")
def written(models, tmp_path_factory, run_mlc_module):
    """{tied: (the Q4_K_M file, the report)}."""
    made = {}
    for tied, src in models.items():
        out = tmp_path_factory.mktemp("kq-out") / "g"
        code, stdout, stderr = run_mlc_module("quantize", src, "--scheme", "q4_k_m", "--format", "gguf", "--out", out, "--json", "--no-eval")
        assert code == 0, stderr
        made[tied] = (out / "model.gguf", json.loads(stdout))
    return made


def test_q4_k_and_q6_k_blocks_dequantise_in_gguf_py_to_the_quantiser_reconstruction_bit_for_bit():
    import gguf
    from gguf.quants import dequantize, quantize

    from mlc.kernels.kquants import quantize_k

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 1024, generator=g) * 0.02
    w[0, 5] = 0.9  # an outlier in one sub-block
    w[1, :256] = 0.0  # an all-zero super-block
    w[2, :32] = 0.01  # a constant sub-block
    w[3, 256:512] = -torch.rand(256, generator=g)  # all negative
    errors = {}
    for kind in ("Q4_K", "Q6_K"):
        blocks, recon = quantize_k(w, kind)
        assert blocks.shape == (64, 1024 // 256 * {"Q4_K": 144, "Q6_K": 210}[kind])
        got = dequantize(blocks.numpy(), gguf.GGMLQuantizationType[kind]).reshape(w.shape)
        assert np.array_equal(got.view(np.uint32), recon.numpy().view(np.uint32)), kind
        assert torch.isfinite(recon).all() and (recon[1, :256] == 0).all()
        errors[kind] = float((recon - w).norm() / w.norm())
    q4_0 = dequantize(quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0), gguf.GGMLQuantizationType.Q4_0).reshape(w.shape)
    errors["Q4_0"] = float(np.linalg.norm(q4_0 - w.numpy()) / np.linalg.norm(w.numpy()))
    # Same 4 bits per weight plus scales; the fitted scale and min per 32 weights cut the error (Q4_K 0.073, Q4_0 0.094 here).
    assert errors["Q6_K"] < errors["Q4_K"] < 0.85 * errors["Q4_0"], errors


def test_each_k_quant_tensor_in_the_file_is_the_source_weight_quantised(written, models):
    import gguf
    from gguf.quants import dequantize

    from mlc.io.hfdir import read_config
    from mlc.io.safetensors_reader import ModelTensors
    from mlc.kernels.kquants import quantize_k

    gguf_file, report = written[False]
    config = read_config(models[False])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_file).tensors}
    seen = set()
    with ModelTensors(models[False]) as source:
        for hf in source.names():
            t = tensors[names.get_name(hf, try_suffixes=(".weight",))]
            if t.tensor_type.name not in ("Q4_K", "Q6_K"):
                continue
            w = source.read(hf, torch.float32)
            if hf.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's RoPE row order
                w = torch.from_numpy(_llama_cpp_permute(w.numpy(), config["num_attention_heads" if "q_proj" in hf else "num_key_value_heads"]))
            blocks, recon = quantize_k(w, t.tensor_type.name)
            assert np.array_equal(np.asarray(t.data).reshape(blocks.shape), blocks.numpy()), hf
            got = dequantize(t.data, t.tensor_type).reshape(w.shape)
            assert np.array_equal(got.view(np.uint32), recon.numpy().view(np.uint32)), hf
            seen.add(t.tensor_type.name)
    assert seen == {"Q4_K", "Q6_K"}
    assert report["format"] == "gguf" and report["size_bytes"] == gguf_file.stat().st_size
    assert report["layers_quantized"] == 4 * 7 + 2  # every Linear of the 4 blocks, the embeddings and the head


def test_mlc_scores_the_file_with_the_weights_gguf_py_reads_from_it(written, models):
    from mlc.commands.quantize.gguf_out import gguf_weights_model
    from mlc.io.dense import open_dense

    gguf_file = written[True][0]
    state = gguf_weights_model(models[True], gguf_file).state_dict()
    dense = open_dense(gguf_file)
    for name in dense.names():
        assert torch.equal(state[name], dense.read(name, torch.float32)), name
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])  # tied, as llama.cpp runs it
    dense.close()


def _llama_cpp_q4_k_m(models, tied, tmp_path):
    """(an F32 GGUF export of the model, llama.cpp's own Q4_K_M of it); the F32 export itself is tested elsewhere."""
    import ctypes

    import llama_cpp

    from mlc.io.formats import ConvertOptions, get_format

    src = tmp_path / "f32"
    src.mkdir()
    ckpt = get_format("hf").open(models[tied], ConvertOptions())
    get_format("gguf").write(ckpt, src, ConvertOptions(quant="F32"))
    ckpt.close()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = Q4_K_M
    params.nthread = 1
    dst = tmp_path / "q4km.gguf"
    assert llama_cpp.llama_model_quantize(str(src / "model.gguf").encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return src / "model.gguf", dst


@pytest.mark.parametrize("tied", [False, True])
def test_each_tensor_gets_the_type_and_the_blocks_llama_quantize_gives_it(written, models, tmp_path, tied):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import gguf
    from gguf.quants import dequantize

    f32_file, their_file = _llama_cpp_q4_k_m(models, tied, tmp_path)
    source = {t.name: t for t in gguf.GGUFReader(f32_file).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(their_file).tensors}
    reader = gguf.GGUFReader(written[tied][0])
    ours = {t.name: t for t in reader.tensors}
    assert {n: t.tensor_type.name for n, t in ours.items()} == {n: t.tensor_type.name for n, t in theirs.items()}
    assert int(reader.fields["general.file_type"].contents()) == Q4_K_M
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= {t.tensor_type.name for t in ours.values()}  # ffn_down's 320-wide rows fall back
    same = {"Q4_K": [], "Q6_K": []}
    for name, t in ours.items():
        kind = t.tensor_type.name
        if kind not in same:  # Q5_0/Q8_0 from gguf-py's quantisers, F32: byte for byte llama.cpp's
            assert np.array_equal(t.data, theirs[name].data), name
            continue
        block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
        mine, their = (np.asarray(x.data).reshape(-1, block_bytes) for x in (t, theirs[name]))
        same[kind].append(np.all(mine == their, axis=1))
        w = np.asarray(source[name].data, dtype=np.float32).reshape(-1)
        err = {k: np.linalg.norm(dequantize(x.data, t.tensor_type).reshape(-1) - w) for k, x in (("mine", t), ("theirs", theirs[name]))}
        assert err["mine"] <= 1.001 * err["theirs"], (name, err)
    # The same search as ggml's, its sums taken in another order: a near-tie between candidate scales can go the
    # other way, so a few super-blocks differ (their error is as good, checked above).
    for kind, flags in same.items():
        assert np.concatenate(flags).mean() > 0.9, (kind, np.concatenate(flags).mean())


@pytest.mark.slow
def test_llama_cpp_runs_the_q4_k_m_file_with_the_logits_of_its_weights(written, models):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from transformers import AutoModelForCausalLM

    from mlc.io.dense import open_dense
    from tests.quantize.test_gguf_out import _llama_cpp_logits

    gguf_file = written[False][0]
    got = _llama_cpp_logits(gguf_file)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(models[False], dtype=torch.float32).eval()
        original = model(ids).logits[0]
        dense = open_dense(gguf_file)  # gguf-py's dequantisation, Q/K rows back in transformers' order
        model.load_state_dict({n: dense.read(n, torch.float32) for n in dense.names()}, strict=False)
        dense.close()
        expected = model(ids).logits[0]
    error = (got - expected).abs().max().item()
    # llama.cpp rounds the activations to Q8_K/Q8_0 for its k-quant dot products: 1.6 here, against the 21.0 that
    # quantising moved these logits (the random embeddings make them large).
    assert error < 0.1 * (original - expected).abs().max().item()


@pytest.mark.parametrize("flags", [[], ["--format", "gguf", "--exclude", "*.down_proj"], ["--format", "gguf", "--group-size", "64"]])
def test_q4_k_m_without_gguf_or_with_options_it_ignores_is_refused_before_any_work(run_mlc_module, small_model_dir, tmp_path, flags):
    code, _, err = run_mlc_module("quantize", small_model_dir, "--scheme", "q4_k_m", *flags, "--out", tmp_path / "g")
    assert code == 2 and ("--format gguf" in err or "does not" in err or "do not" in err), err
    assert not (tmp_path / "g").exists()
