"""`mlc checkpoint convert` and the GGUF format plugin: GGUF files become complete, loadable HF directories."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from mlc.models import load_model


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute, copied as the reference for the forward direction.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_like_llama_cpp(hf_dir, out, arch_name: str) -> None:
    """Write an HF checkpoint as GGUF the way llama.cpp's converter does: names from gguf's own
    TensorNameMap, experts stacked, Q/K rows permuted for the llama architecture, Q8_0 matrices."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2moe": gguf.MODEL_ARCH.QWEN2MOE}[arch_name]
    names = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    tensors = load_file(str(hf_dir / "model.safetensors"))
    w = gguf.GGUFWriter(str(out), arch_name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_vocab_size(cfg["vocab_size"])
    if arch_name == "llama":
        w.add_expert_count(cfg["num_local_experts"])
    else:
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    # A byte-level vocabulary the size of the model's, no merges.
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([chr(0x100 + i) for i in range(cfg["vocab_size"] - 1)] + ["<|end|>"])
    w.add_token_types([1] * (cfg["vocab_size"] - 1) + [3])
    w.add_token_merges([])
    w.add_eos_token_id(cfg["vocab_size"] - 1)
    stacked: dict[str, list[tuple[int, np.ndarray]]] = {}
    for name, t in tensors.items():
        base, kind = name.rsplit(".", 1)
        m = re.match(r"(.*\.experts)\.(\d+)\.(\w+)$", base)
        if m:  # per-expert HF tensors -> one stacked GGUF tensor
            stacked.setdefault(f"{m[1]}.{m[3]}", []).append((int(m[2]), t))
            continue
        if base.endswith("q_proj"):
            t = _llama_cpp_permute(t, cfg["num_attention_heads"]) if arch_name == "llama" else t
        if base.endswith("k_proj"):
            t = _llama_cpp_permute(t, cfg["num_key_value_heads"]) if arch_name == "llama" else t
        _add(w, f"{names.get_name(base)}.{kind}", t)
    for base, parts in stacked.items():
        _add(w, f"{names.get_name(base)}.weight", np.stack([t for _, t in sorted(parts, key=lambda p: p[0])]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add(writer, name: str, t: np.ndarray) -> None:
    import gguf

    if t.ndim >= 2 and t.shape[-1] % 32 == 0:
        q = gguf.quants.quantize(t.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, t.astype(np.float32))


@pytest.mark.parametrize("arch,gguf_arch", [("mixtral", "llama"), ("qwen2_moe", "qwen2moe")])
def test_a_moe_gguf_converts_to_per_expert_hf_tensors_with_the_original_logits(arch, gguf_arch, tiny_hf_model, tmp_path, run_mlc):
    from transformers import AutoModelForCausalLM

    # llama.cpp's qwen2moe has no dense layers, so this one has none either.
    src = tiny_hf_model(arch, mlp_only_layers=[]) if arch == "qwen2_moe" else tiny_hf_model(arch)
    gguf_file = tmp_path / "tiny.gguf"
    write_gguf_like_llama_cpp(src, gguf_file, gguf_arch)
    code, out, err = run_mlc("checkpoint", "convert", gguf_file, "--to", "hf", "--out", tmp_path / "hf")
    assert code == 0, err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [{"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[arch]]
    ids = torch.randint(0, 127, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
        converted = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
        native = load_model(tmp_path / "hf")(ids).logits
    # Q8_0 rounding is the only difference from the original weights.
    assert (converted - original).abs().max().item() < 0.05 * original.abs().max().item()
    assert (native - converted).abs().max().item() <= 1e-4


def test_convert_cli_turns_smollm2_gguf_into_a_complete_hf_directory_and_records_a_run(smollm2_gguf, tmp_path, run_mlc):
    out = tmp_path / "smol"
    code, stdout, err = run_mlc("checkpoint", "convert", smollm2_gguf, "--to", "hf", "--out", out, "--dtype", "bf16", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["from"] == "gguf" and result["out"] == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert "<|im_start|>" in json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    run_dir = next(run_mlc.runs_dir.glob("*-checkpoint-*"))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["artifacts"]["model"]["path"] == str(out)
    assert load_model(out).lm_head.weight.dtype == torch.bfloat16


def test_a_file_no_format_recognises_is_refused_naming_the_installed_formats(tmp_path, run_mlc):
    junk = tmp_path / "weights.dat"
    junk.write_bytes(b"\x00" * 64)
    code, _, err = run_mlc("checkpoint", "convert", junk, "--to", "hf", "--out", tmp_path / "out")
    assert code == 1
    assert "no installed checkpoint format recognises" in err and "gguf" in err
    assert not (tmp_path / "out").exists()


def test_an_unwritable_target_format_is_a_usage_error(smollm2_gguf, tmp_path, run_mlc):
    code, _, err = run_mlc("checkpoint", "convert", smollm2_gguf, "--to", "onnx", "--out", tmp_path / "out")
    assert code == 2 and "onnx" in err
