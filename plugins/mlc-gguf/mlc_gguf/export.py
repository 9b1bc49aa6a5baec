"""Any opened checkpoint (HF tensor names + config + tokenizer) -> one GGUF file that llama.cpp loads.

Written with the `gguf` package's GGUFWriter in its streaming order (tensor infos first, then each tensor's
data as it is read), so memory holds one tensor. Quantised types: Q8_0 and Q4_0 (gguf-py's quantisers), and
Q4_K_M, llama.cpp's mix of Q4_K and Q6_K (mlc.kernels.kquants quantises those; gguf-py has only their
dequantisers) with Q5_0/Q8_0 where rows are not whole 256-wide super-blocks. The other k-quants are not
written (llama.cpp's `llama-quantize` turns an F16 GGUF into any of them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mlc.errors import InputError, MlcUsageError
from mlc_gguf.weights import GLOBAL_NAMES, LAYER_NAMES

QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M")
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "BF16": 32}  # llama.cpp's LlamaFileType
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
HF_TO_GGUF = {v: k for k, v in GLOBAL_NAMES.items()}
LAYER_HF_TO_GGUF = {v: k for k, v in LAYER_NAMES.items() if "{" not in v and "shexp" not in k}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# The tokenizer.json pre-tokenizers mlc recognises -> llama.cpp's tokenizer.ggml.pre name (the reader's table, reversed).
DIGITS_THEN_BYTES = [{"type": "Digits", "individual_digits": True}, "ByteLevel"]


def gguf_name(hf: str) -> str:
    if hf in HF_TO_GGUF:
        return HF_TO_GGUF[hf]
    parts = hf.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) >= 5:
        module, kind = ".".join(parts[3:-1]), parts[-1]
        if module in LAYER_HF_TO_GGUF:
            return f"blk.{parts[2]}.{LAYER_HF_TO_GGUF[module]}.{kind}"
    raise InputError(f"tensor {hf!r} has no GGUF name in mlc's export", "GGUF export covers dense llama, mistral and qwen2 models")


def permute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp pairs adjacent dimensions in RoPE; transformers pairs the two halves of each head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def pre_tokenizer_name(pre: Any) -> str:
    if pre is None:
        raise InputError("tokenizer.json has no pre-tokenizer", "GGUF export needs a byte-level BPE tokenizer")
    if pre.get("type") == "ByteLevel":
        return "gpt2"
    if pre.get("type") == "Sequence":
        kinds = [p.get("type") for p in pre.get("pretokenizers", [])]
        if kinds == ["Digits", "ByteLevel"] and pre["pretokenizers"][0].get("individual_digits"):
            return "smollm"
    raise InputError(f"tokenizer.json's pre-tokenizer {json.dumps(pre)[:80]} has no llama.cpp name known to mlc", "GGUF export knows byte-level BPE (gpt2) and SmolLM's")


def add_tokenizer(writer: Any, assets: Path | None, config: dict[str, Any]) -> None:
    if assets is None or not (assets / "tokenizer.json").is_file():
        raise InputError("the checkpoint has no tokenizer.json to put into the GGUF file", "pass --config with the model's HF directory")
    tok = json.loads((assets / "tokenizer.json").read_text())
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise InputError(f"{assets / 'tokenizer.json'}: tokenizer model {model.get('type')!r} is not byte-level BPE", "GGUF export writes gpt2-style BPE vocabularies")
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    size = max(int(config["vocab_size"]), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (CONTROL if added[i].get("special") else USER_DEFINED) if i in added else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tok.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    tcfg = json.loads((assets / "tokenizer_config.json").read_text()) if (assets / "tokenizer_config.json").is_file() else {}

    def token_id(key: str) -> int | None:
        value = tcfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value in vocab:
            return vocab[value]
        return config.get(f"{key}_id")

    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id), ("pad_token", writer.add_pad_token_id), ("unk_token", writer.add_unk_token_id)):
        i = token_id(key)
        if i is not None:
            add(int(i))
    writer.add_add_bos_token(bool(tcfg.get("add_bos_token", False)))
    if tcfg.get("chat_template"):
        writer.add_chat_template(tcfg["chat_template"])


def add_hparams(writer: Any, config: dict[str, Any]) -> None:
    from mlc.models.config import config_from_hf

    cfg = config_from_hf(config)
    if cfg.is_moe:
        raise InputError(f"GGUF export of {cfg.model_type} (mixture of experts) is not supported", "export a dense model")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling:
        raise InputError(f"GGUF export of RoPE scaling {scaling.get('rope_type')!r} is not supported", "mlc exports default and linear RoPE")
    if getattr(cfg, "sliding_window", None):
        raise InputError("GGUF export of sliding-window attention is not supported", "export a model without sliding_window")


def encode(t: torch.Tensor, quant: str) -> tuple[np.ndarray, Any]:
    """(array to write, GGML type): 1-D tensors stay F32 (llama.cpp's rule); rows not a multiple of 32 fall back to F16."""
    import gguf
    from gguf.quants import quantize

    T = gguf.GGMLQuantizationType
    if t.ndim < 2 or quant == "F32":
        return t.float().numpy(), T.F32
    if quant in ("Q4_K", "Q6_K"):
        from mlc.kernels.kquants import quantize_k

        return quantize_k(t, quant)[0].numpy(), T[quant]
    if quant in ("Q8_0", "Q5_0", "Q4_0") and t.shape[-1] % 32 == 0:
        return quantize(t.float().numpy(), T[quant]), T[quant]
    if quant == "BF16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(*t.shape[:-1], -1), T.BF16
    return t.to(torch.float16).numpy(), T.F16


def write_gguf(ckpt: Any, out_file: Path, quant: str, int_weights: Callable[[str], Any] | None = None,
               progress: Callable[[int, int], None] | None = None) -> None:
    """Stream ckpt into out_file, every tensor in `quant` (1-D ones F32; Q4_K_M: each tensor's type by llama.cpp's rule).

    int_weights(HF name) gives mlc's integer weight (mlc.kernels.quant_weights.IntWeight) for a tensor that is
    already quantised, or None: those are stored as the GGML blocks holding the same integers (mlc_gguf.requant),
    the others in `quant`, and the file type says the integer one. progress(done, total) after each tensor.
    """
    import gguf

    from mlc_gguf.requant import encode_int, ggml_type

    quant = quant.upper()
    if quant not in QUANTS:
        raise MlcUsageError(f"--quant {quant} is not a GGUF type mlc writes", f"choose one of {', '.join(QUANTS)} (other k-quants: run llama-quantize on an F16 export)")
    config = ckpt.config
    if config is None:
        raise InputError(f"{ckpt.path} carries no model config, which GGUF export needs", "pass --config with the model's config.json")
    arch = ARCHS.get(config.get("model_type"))
    if arch is None:
        raise InputError(f"GGUF export of model_type {config.get('model_type')!r} is not supported", f"mlc exports {', '.join(ARCHS)}")
    entries = [e for e in ckpt.tensors() if not e.is_optimizer]
    names = {e.name for e in entries}
    if config.get("tie_word_embeddings") or "lm_head.weight" not in names:
        entries = [e for e in entries if e.name != "lm_head.weight"]  # llama.cpp ties when output.weight is absent
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])

    def exact(e: Any) -> Any:
        w = int_weights(e.name) if int_weights is not None else None
        if w is not None and arch == "llama" and e.name.endswith(("q_proj.weight", "k_proj.weight")):
            n = heads if ".q_proj." in e.name else kv_heads
            w = type(w)(permute_rope_rows(w.q, n), permute_rope_rows(w.scale, n), None, w.bits, w.group_size)
        return w

    exact_types = {}
    for e in entries:  # every integer weight is checked before the file is started
        w = exact(e)
        if w is not None:
            exact_types[e.name] = gguf.GGMLQuantizationType[ggml_type(w, e.name)]
    file_type = quant
    if exact_types:
        file_type = "Q4_0" if gguf.GGMLQuantizationType.Q4_0 in exact_types.values() else "Q8_0"
    writer = gguf.GGUFWriter(str(out_file), arch)
    writer.add_name(Path(str(ckpt.path)).name)
    writer.add_file_type(FILE_TYPES[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(writer, config)
    add_tokenizer(writer, ckpt.assets, config)
    has_output = any(e.name == "lm_head.weight" for e in entries)
    plan = []
    for e in entries:
        name = gguf_name(e.name)
        probe = torch.empty(e.shape, dtype=torch.float32, device="meta")
        if e.name in exact_types:
            qtype = exact_types[e.name]
        elif quant == "Q4_K_M":
            from mlc.kernels.kquants import q4_k_m_type

            kind = q4_k_m_type(name, tuple(e.shape), int(config["num_hidden_layers"]), has_output)
            qtype = gguf.GGMLQuantizationType[kind or "F32"]
        elif probe.ndim < 2 or quant == "F32":
            qtype = gguf.GGMLQuantizationType.F32
        elif quant in ("Q8_0", "Q4_0") and e.shape[-1] % 32 == 0:
            qtype = gguf.GGMLQuantizationType[quant]
        else:
            qtype = gguf.GGMLQuantizationType.BF16 if quant == "BF16" else gguf.GGMLQuantizationType.F16
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = probe.numel() // block * size
        byte_shape = gguf.quants.quant_shape_to_byte_shape(e.shape, qtype) if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else e.shape
        dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(qtype, np.uint8)
        writer.add_tensor_info(name, byte_shape, np.dtype(dtype), nbytes, raw_dtype=None if dtype is not np.uint8 else qtype)
        plan.append((e, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (e, qtype) in enumerate(plan):
        if progress:
            progress(i, len(plan))
        if e.name in exact_types:
            array, written = encode_int(exact(e), e.name)
            assert written == qtype.name, (e.name, written, qtype)
            writer.write_tensor_data(np.ascontiguousarray(array))
            continue
        t = ckpt.read(e.name).float()
        if arch == "llama" and e.name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            t = permute_rope_rows(t, heads if ".q_proj." in e.name else kv_heads)
        array, written = encode(t, qtype.name)
        assert written == qtype, (e.name, written, qtype)
        writer.write_tensor_data(np.ascontiguousarray(array))
        del t, array
    writer.close()
    if progress:
        progress(len(plan), len(plan))
