"""How fast a model can possibly serve on given hardware: bytes and FLOPs per token against bandwidth and FLOP/s.

From config.json (Llama/Mistral/Qwen2 dense, Mixtral and Qwen2-MoE experts):
- weight bytes per decode step: every block weight plus the output head is read once per step (the
  embedding table is not: one row per token), for each dtype and quantisation layout: fp32, bf16, int8
  and fp8 (one bf16 scale per output row), int4 with groups of 128 or 32 and nf4 with groups of 64 (one
  bf16 scale per group); norms, embeddings and the head stay bf16 (fp32 for fp32), as mlc quantize
  leaves them. "stored" is the model directory's own tensors, read from its safetensors headers.
  MoE: at batch B the step reads the experts B tokens are expected to hit, E * (1 - (1 - k/E)^B).
- KV bytes per token: 2 (K and V) x layers x KV heads x head dim x the KV dtype's bytes.
- FLOPs: 2 per weight per token (the active experts only), plus attention's 4 x layers x heads x head
  dim per token of context; prefill of P tokens computes logits for the last one only (as servers do).
- decode at batch B over context C: a step takes at least max(bytes / bandwidth, FLOPs / FLOP/s), with
  bytes = weights + B x C x KV bytes per token and FLOPs = B x FLOPs per token; tokens/s <= B / that.
  The batch-1 figure is the memory-bound ceiling of one stream; the compute-bound batch is the smallest
  B whose step is limited by FLOP/s rather than bytes (none if KV reads grow faster than compute).
- the concurrency a KV budget allows: budget / (KV bytes per token x C).
Given a `bench serve` result, the decode rate reached (1000 / median TPOT per stream, and the output
tokens/s) is set against the bound at the result's concurrency and mean context; with cpu:auto and a
result that has the server's CPU time, also output tokens per server CPU-second against the bound per
busy core: the same bound computed from bytes and FLOPs per CPU-second of the measurement (hardware.py), or,
without those, the bound / measuring threads. On cores other jobs share, the figure the sharing disturbs least.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlc.commands.bench.hardware import Hardware
from mlc.errors import InputError

SCHEMES: dict[str, tuple[float, int | None]] = {  # name: (bits per weight, group size for a bf16 scale; None = one per row)
    "fp32": (32, 0), "bf16": (16, 0), "int8": (8, None), "fp8": (8, None), "int4-g128": (4, 128), "int4-g32": (4, 32), "nf4-g64": (4, 64),
}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


@dataclass
class Shape:
    """The sizes that decide bytes and FLOPs."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    dense_layers: int  # layers with a dense MLP of `intermediate`
    intermediate: int
    experts: int = 0  # per MoE layer
    top_k: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    def matrices(self, experts_read: float) -> list[tuple[float, int, int]]:
        """(count, rows, cols) of the block weight matrices read in one step, `experts_read` experts per MoE layer."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = [(self.layers, q, h), (2 * self.layers, kv, h), (self.layers, h, q)]  # q, k and v, o
        out += [(2 * self.dense_layers, self.intermediate, h), (self.dense_layers, h, self.intermediate)]  # gate and up, down
        if self.experts:
            n = self.moe_layers * experts_read
            out += [(2 * n, self.expert_intermediate, h), (n, h, self.expert_intermediate), (self.moe_layers, self.experts, h)]  # + router
            if self.shared_intermediate:  # Qwen2-MoE: a shared expert and its one-output gate
                out += [(2 * self.moe_layers, self.shared_intermediate, h), (self.moe_layers, h, self.shared_intermediate), (self.moe_layers, 1, h)]
        return out

    def params(self, experts_read: float | None = None) -> float:
        n = self.experts if experts_read is None else experts_read
        blocks = sum(c * r * k for c, r, k in self.matrices(n))
        return blocks + self.vocab * self.hidden * (1 if self.tied else 2)


def shape_of(config: dict[str, Any]) -> Shape:
    try:
        h, layers, heads = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError):
        raise InputError("config.json lacks hidden_size, num_hidden_layers, num_attention_heads or vocab_size", "a decoder-only transformer's config is needed") from None
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    dense_layers = layers
    if experts:
        sparse_step = int(config.get("decoder_sparse_step") or 1)
        only_mlp = set(config.get("mlp_only_layers") or [])
        moe = [i for i in range(layers) if i not in only_mlp and (i + 1) % sparse_step == 0]
        dense_layers = layers - len(moe)
    return Shape(
        layers=layers, hidden=h, heads=heads, kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or h // heads), vocab=vocab, tied=bool(config.get("tie_word_embeddings", False)),
        dense_layers=dense_layers, intermediate=int(config.get("intermediate_size") or 0), experts=experts,
        top_k=int(config.get("num_experts_per_tok") or 0),
        expert_intermediate=int(config.get("moe_intermediate_size") or config.get("intermediate_size") or 0),
        shared_intermediate=int(config.get("shared_expert_intermediate_size") or 0),
    )


def weight_bytes(shape: Shape, scheme: str, experts_read: float) -> float:
    """Bytes one step reads: block matrices in the scheme's layout, the head and the norms in 16 (or 32) bits."""
    bits, group = SCHEMES[scheme]
    base = 4 if scheme == "fp32" else 2
    total = 0.0
    for count, rows, cols in shape.matrices(experts_read):
        scales = 0 if group == 0 else rows * 2 if group is None else rows * math.ceil(cols / group) * 2
        total += count * (rows * cols * bits / 8 + scales)
    norms = (2 * shape.layers + 1) * shape.hidden
    return total + (shape.vocab * shape.hidden + norms) * base


def stored_bytes(model_dir: Path) -> dict[str, float] | None:
    """Bytes of the directory's tensors by kind (embedding, experts, the rest), from safetensors headers; None if none."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    kinds = {"embedding": 0.0, "experts": 0.0, "rest": 0.0, "head": 0.0}
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise InputError(f"{f} has a damaged safetensors header", "re-download or re-convert the model") from None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            kind = "embedding" if "embed_tokens" in name else "head" if name.startswith("lm_head") else "experts" if ".experts." in name else "rest"
            kinds[kind] += end - start
    return kinds


def expected_experts(shape: Shape, batch: float) -> float:
    """Distinct experts per MoE layer that `batch` tokens, each routed to top_k of E uniformly, are expected to hit."""
    if not shape.experts:
        return 0.0
    return shape.experts * (1 - (1 - shape.top_k / shape.experts) ** batch)


def flops_per_token(shape: Shape, context: float) -> float:
    """Forward FLOPs of one decode token at `context` tokens of history."""
    return 2 * shape.params(shape.top_k if shape.experts else None) - 2 * shape.vocab * shape.hidden * (0 if shape.tied else 1) + 4 * shape.layers * shape.heads * shape.head_dim * context


def prefill_flops(shape: Shape, prompt: int) -> float:
    """FLOPs of a prompt of `prompt` tokens: every block weight per token, attention over the causal triangle, one row of logits."""
    blocks = shape.params(shape.top_k if shape.experts else None) - shape.vocab * shape.hidden * (1 if shape.tied else 2)
    return 2 * blocks * prompt + 4 * shape.layers * shape.heads * shape.head_dim * prompt * (prompt + 1) / 2 + 2 * shape.vocab * shape.hidden


def step_bytes(shape: Shape, weights: dict[str, float] | None, scheme: str, batch: int, context: float, kv_per_token: float) -> float:
    experts = expected_experts(shape, batch)
    if scheme == "stored" and weights is not None:
        head = weights["head"] or weights["embedding"]  # a tied head is the embedding table, read whole
        moe = weights["experts"] * (experts / shape.experts if shape.experts else 0)
        w = weights["rest"] + moe + head
    else:
        w = weight_bytes(shape, scheme, experts)
    return w + batch * context * kv_per_token


def decode_bound(shape: Shape, hw: Hardware, weights: dict[str, float] | None, scheme: str, batch: int, context: float, kv_per_token: float) -> float:
    """Upper limit of aggregate decode tokens/s at `batch` streams of `context` tokens."""
    t_mem = step_bytes(shape, weights, scheme, batch, context, kv_per_token) / hw.mem_bw
    t_compute = batch * flops_per_token(shape, context) / hw.flops
    return batch / max(t_mem, t_compute)


def compute_bound_batch(shape: Shape, hw: Hardware, weights: dict[str, float] | None, scheme: str, context: float, kv_per_token: float, limit: int = 1 << 20) -> int | None:
    """The smallest batch whose step is limited by FLOP/s rather than bytes, or None below `limit`."""
    def compute_bound(b: int) -> bool:
        return b * flops_per_token(shape, context) / hw.flops >= step_bytes(shape, weights, scheme, b, context, kv_per_token) / hw.mem_bw

    if not compute_bound(limit):
        return None
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if compute_bound(mid) else (mid + 1, hi)
    return lo


def kv_dtype_bytes(config: dict[str, Any], scheme: str) -> int:
    """The KV cache's bytes per value: the activation dtype a server runs the weights with (mlc serve's rule)."""
    if scheme == "fp32":
        return 4
    if scheme == "stored":
        return 4 if str(config.get("torch_dtype", "")) == "float32" and "quantization_config" not in config else 2
    return 2


def report(model_dir: Path, hw: Hardware, scheme: str | None, context: int, prompt_len: int, batches: list[int],
           kv_budget: int | None, result: dict[str, Any] | None) -> dict[str, Any]:
    """Everything `mlc bench roofline` prints, as a dict."""
    from mlc.io.hfdir import read_config

    config = read_config(model_dir)
    shape = shape_of(config)
    stored = stored_bytes(model_dir)
    scheme = scheme or ("stored" if stored else "bf16")
    if scheme == "stored" and stored is None:
        raise InputError(f"{model_dir} has no safetensors files to measure", "pick a --weights scheme: " + ", ".join(SCHEMES))
    kv_bytes = kv_dtype_bytes(config, scheme)
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * kv_bytes
    if result is not None:  # the result's own mean context and concurrency
        completed = max(int(result["completed"]), 1)
        prompt_mean, output_mean = result["total_input_tokens"] / completed, result["total_output_tokens"] / completed
        context = int(round(prompt_mean + output_mean / 2))
    schemes = (["stored"] if stored else []) + list(SCHEMES)
    rows = []
    for s in schemes:
        kvb = 2 * shape.layers * shape.kv_heads * shape.head_dim * kv_dtype_bytes(config, s)
        rows.append({
            "weights": s,
            "bytes_per_step_batch1": step_bytes(shape, stored, s, 1, 0, kvb),
            "decode_tok_s_batch1": decode_bound(shape, hw, stored, s, 1, context, kvb),
            "compute_bound_batch": compute_bound_batch(shape, hw, stored, s, context, kvb),
        })
    out: dict[str, Any] = {
        "model": str(model_dir),
        "shape": vars(shape),
        "params": shape.params(),
        "active_params_per_token": shape.params(shape.top_k) if shape.experts else shape.params(),
        "hardware": {"name": hw.name, "mem_bw_bytes_s": hw.mem_bw, "flops": hw.flops, "ridge_flop_per_byte": hw.ridge, "source": hw.source,
                     "mem_bw_bytes_per_cpu_s": hw.mem_bw_per_cpu_s, "flops_per_cpu_s": hw.flops_per_cpu_s},
        "weights": scheme,
        "context": context,
        "kv_bytes_per_token": kv_per_token,
        "decode_flops_per_token": flops_per_token(shape, context),
        "prefill_len": prompt_len,
        "prefill_flops": prefill_flops(shape, prompt_len),
        "prefill_s_min": max(prefill_flops(shape, prompt_len) / hw.flops, step_bytes(shape, stored, scheme, prompt_len, 0, 0) / hw.mem_bw),
        "schemes": rows,
        "batches": [{"batch": b, "decode_tok_s": decode_bound(shape, hw, stored, scheme, b, context, kv_per_token),
                     "limited_by": "compute" if b * flops_per_token(shape, context) / hw.flops >= step_bytes(shape, stored, scheme, b, context, kv_per_token) / hw.mem_bw else "memory"}
                    for b in batches],
        "compute_bound_batch": compute_bound_batch(shape, hw, stored, scheme, context, kv_per_token),
    }
    if kv_budget:
        out["kv_budget_bytes"] = kv_budget
        out["kv_budget_tokens"] = kv_budget // kv_per_token
        out["kv_budget_concurrency"] = kv_budget // (kv_per_token * max(context, 1))
    if result is not None:
        out["result"] = reached(result, shape, hw, stored, scheme, context, kv_per_token)
    return out


def reached(result: dict[str, Any], shape: Shape, hw: Hardware, stored: dict[str, float] | None, scheme: str, context: int, kv_per_token: float) -> dict[str, Any]:
    """How close a bench result came: per-stream decode rate and output tokens/s against the bound at its concurrency."""
    batch = int(result.get("max_concurrency") or result.get("max_concurrent_requests") or 1)
    bound = decode_bound(shape, hw, stored, scheme, batch, context, kv_per_token)
    tpot = result.get("median_tpot_ms") or 0.0
    per_stream = 1000.0 / tpot if tpot > 0 else None
    out = {
        "batch": batch,
        "context": context,
        "bound_tok_s": bound,
        "bound_per_stream_tok_s": bound / batch,
        "per_stream_tok_s": per_stream,
        "per_stream_fraction": per_stream / (bound / batch) if per_stream else None,
        "output_tok_s": result["output_throughput"],
        "output_fraction": result["output_throughput"] / bound,
    }
    per_cpu = result.get("output_tokens_per_server_cpu_s")
    if per_cpu and hw.threads:  # on shared cores the steadier figure: work per CPU-second against the bound per busy core
        if hw.mem_bw_per_cpu_s and hw.flops_per_cpu_s:  # measured per CPU-second: the wall figures shrink with the load, these do not
            per_core = Hardware(hw.name, hw.mem_bw_per_cpu_s, hw.flops_per_cpu_s, hw.source)
            bound_cpu = decode_bound(shape, per_core, stored, scheme, batch, context, kv_per_token)
        else:
            bound_cpu = bound / hw.threads
        out["per_server_cpu_s_tok"] = per_cpu
        out["bound_per_cpu_s_tok"] = bound_cpu
        out["per_server_cpu_s_fraction"] = per_cpu / bound_cpu
    return out
