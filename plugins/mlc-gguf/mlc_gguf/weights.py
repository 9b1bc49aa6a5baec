"""GGUF tensors and metadata -> Hugging Face config.json and tensor names, dequantised.

llama.cpp's converter permutes the rows of Q and K for the llama architecture (its RoPE pairs
adjacent dimensions, transformers' pairs the two halves of each head); reading undoes that.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from mlc.errors import InputError
from mlc.models.rope import inverse_frequencies

# GGUF general.architecture -> the transformers families mlc writes (dense, MoE).
ARCHITECTURES = {"llama": ("llama", "mixtral"), "qwen2": ("qwen2", None), "qwen2moe": (None, "qwen2_moe")}

GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "{moe}.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Stacked expert tensors (experts, out, in) -> one tensor per expert: (mixtral name, qwen2_moe name).
EXPERT_NAMES = {"ffn_gate_exps": ("w1", "gate_proj"), "ffn_up_exps": ("w3", "up_proj"), "ffn_down_exps": ("w2", "down_proj")}
LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Known llama3 RoPE settings, recognised from the rope_freqs tensor llama.cpp stores instead of metadata.
LLAMA3_CANDIDATES = [
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
]


def field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value; float32 values come back as the shortest decimal (1e-05, not 9.99999974e-06)."""
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    if isinstance(value, float):
        value = float(str(np.float32(value)))
    return value


@dataclass
class HFTensor:
    name: str
    shape: tuple[int, ...]
    read: Any  # () -> torch.Tensor (float32)


class GGUFModel:
    """One GGUF file: its HF config and an iterator over dequantised HF-named tensors."""

    def __init__(self, reader: GGUFReader, path: str):
        self.reader = reader
        self.path = path
        self.arch = field(reader, "general.architecture")
        if self.arch not in ARCHITECTURES:
            raise InputError(
                f"{path}: GGUF architecture {self.arch!r} is not supported",
                f"mlc reads GGUF architectures {', '.join(ARCHITECTURES)}",
            )
        self.tensors = {t.name: t for t in reader.tensors}
        self._fd: int | None = None
        self.config = self._config()

    def meta(self, key: str, default: Any = None) -> Any:
        return field(self.reader, f"{self.arch}.{key}", default)

    def _config(self) -> dict[str, Any]:
        experts = int(self.meta("expert_count", 0) or 0)
        dense, moe = ARCHITECTURES[self.arch]
        family = moe if experts else dense
        if family is None:
            raise InputError(f"{self.path}: {self.arch} GGUF without experts", "the file is inconsistent")
        heads = int(self.meta("attention.head_count"))
        hidden = int(self.meta("embedding_length"))
        tokens = field(self.reader, "tokenizer.ggml.tokens") or []
        config: dict[str, Any] = {
            "model_type": family,
            "vocab_size": int(self.meta("vocab_size", 0) or len(tokens) or self.tensors["token_embd.weight"].shape[1]),
            "hidden_size": hidden,
            "intermediate_size": int(self.meta("feed_forward_length", 0) or 0),
            "num_hidden_layers": int(self.meta("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.meta("attention.head_count_kv", heads)),
            "head_dim": int(self.meta("attention.key_length", 0) or self.meta("rope.dimension_count", 0) or hidden // heads),
            "max_position_embeddings": int(self.meta("context_length", 2048)),
            "rms_norm_eps": float(self.meta("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self.meta("rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "hidden_act": "silu",
        }
        for key in ("bos", "eos", "padding"):
            value = field(self.reader, f"tokenizer.ggml.{key}_token_id")
            if value is not None:
                config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(value)
        config["rope_scaling"] = self._rope_scaling(config)
        if family == "mixtral":
            config.update(num_local_experts=experts, num_experts_per_tok=int(self.meta("expert_used_count", 2)))
        if family == "qwen2_moe":
            config.update(
                num_experts=experts,
                num_experts_per_tok=int(self.meta("expert_used_count", 4)),
                moe_intermediate_size=int(self.meta("expert_feed_forward_length")),
                shared_expert_intermediate_size=int(self.meta("expert_shared_feed_forward_length", 0) or 0),
                norm_topk_prob=bool(self.meta("expert_weights_norm", False)),
            )
        if family == "llama" and "blk.0.attn_q.bias" in self.tensors:
            config["attention_bias"] = True
        return config

    def _rope_scaling(self, config: dict[str, Any]) -> dict[str, Any] | None:
        kind = self.meta("rope.scaling.type")
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(self.meta("rope.scaling.factor"))}
        if kind not in (None, "none"):
            raise InputError(f"{self.path}: GGUF RoPE scaling {kind!r} is not supported", "mlc supports linear and llama3")
        if "rope_freqs.weight" not in self.tensors:
            return None
        # llama.cpp stores llama3 scaling as per-frequency divisors; find the standard setting that produced them.
        stored = torch.from_numpy(np.array(dequantize(self.tensors["rope_freqs.weight"].data, self.tensors["rope_freqs.weight"].tensor_type), dtype=np.float32)).reshape(-1)
        base = inverse_frequencies(config["head_dim"], config["rope_theta"], None)
        for candidate in LLAMA3_CANDIDATES:
            scaling = {"rope_type": "llama3", **candidate}
            divisors = base / inverse_frequencies(config["head_dim"], config["rope_theta"], scaling)
            if divisors.shape == stored.shape and torch.allclose(divisors, stored, rtol=1e-4):
                return scaling
        raise InputError(f"{self.path}: its rope_freqs tensor matches no known llama3 RoPE setting", "convert from the original HF checkpoint instead")

    def hf_tensors(self) -> Iterator[HFTensor]:
        """Every weight under its HF name and shape, each read (dequantised, unpermuted) on demand."""
        family = self.config["model_type"]
        for name, t in self.tensors.items():
            if name == "rope_freqs.weight":
                continue  # folded into config.json's rope_scaling
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if name in GLOBAL_NAMES:
                yield HFTensor(GLOBAL_NAMES[name], shape, lambda t=t, s=shape: self._read(t, s))
                continue
            m = LAYER_RE.match(name)
            if m is None:
                raise InputError(f"{self.path}: unexpected tensor {name!r}", "this GGUF variant is not supported")
            layer, part, kind = int(m[1]), m[2], m[3]
            prefix = f"model.layers.{layer}."
            if part in EXPERT_NAMES:
                experts, rows, cols = shape
                hf_part = EXPERT_NAMES[part][0 if family == "mixtral" else 1]
                moe = "block_sparse_moe" if family == "mixtral" else "mlp"
                stacked = _ReadOnce(lambda t=t, s=shape: self._read(t, s))
                for e in range(experts):
                    yield HFTensor(f"{prefix}{moe}.experts.{e}.{hf_part}.weight", (rows, cols), lambda r=stacked, e=e: r()[e])
                continue
            if part not in LAYER_NAMES:
                raise InputError(f"{self.path}: unexpected tensor {name!r}", "this GGUF variant is not supported")
            hf_name = prefix + LAYER_NAMES[part].format(moe="block_sparse_moe" if family == "mixtral" else "mlp") + "." + kind
            if part == "ffn_gate_inp_shexp":
                shape = (1, shape[-1])  # GGUF stores the shared-expert gate as a vector
            yield HFTensor(hf_name, shape, lambda t=t, s=shape, part=part: self._unpermute(part, self._read(t, s)))

    def _read(self, t: Any, shape: tuple[int, ...]) -> torch.Tensor:
        data = self._bytes(t)
        values = dequantize(data, t.tensor_type) if t.tensor_type != GGMLQuantizationType.BF16 else None
        if values is None:  # gguf's numpy has no bf16: widen the raw bits to float32
            values = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        values = np.ascontiguousarray(values, dtype=np.float32)
        if not values.flags.writeable:
            values = values.copy()
        return torch.from_numpy(values).reshape(shape)

    def _bytes(self, t: Any) -> np.ndarray:
        """The tensor's stored bytes, read with pread into memory the caller owns.

        GGUFReader's t.data is a view of its memory map: every page read through it stays mapped (and counted
        in the process's RSS) until the reader closes, so converting a 2 GB file touched 2.5 GB of RSS.
        """
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        raw = os.pread(self._fd, int(t.n_bytes), int(t.data_offset))
        if len(raw) != int(t.n_bytes):
            raise InputError(f"{self.path} ends inside tensor {t.name!r}", "the file is truncated")
        return np.frombuffer(raw, dtype=t.data.dtype).reshape(t.data.shape)

    def _unpermute(self, part: str, w: torch.Tensor) -> torch.Tensor:
        if self.arch != "llama" or part not in ("attn_q", "attn_k"):
            return w
        heads = self.config["num_attention_heads"] if part == "attn_q" else self.config["num_key_value_heads"]
        return unpermute_rope_rows(w, heads)


class _ReadOnce:
    """Dequantise a stacked expert tensor once, however many experts are sliced from it."""

    def __init__(self, read: Any):
        self.read, self.value = read, None

    def __call__(self) -> torch.Tensor:
        if self.value is None:
            self.value = self.read()
        return self.value


def unpermute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Invert llama.cpp's permute(): per head, rows (pair, 2) interleaved back to (2, half)."""
    rows = w.shape[0]
    half = rows // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
