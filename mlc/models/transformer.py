"""The native decoder-only transformer: Llama, Mistral, Qwen2, Mixtral and Qwen2-MoE in one module.

Module names mirror the Hugging Face checkpoints, so `model.state_dict()` keys are the tensor names
on disk (model.layers.0.self_attn.q_proj.weight, ...block_sparse_moe.experts.3.w1.weight, lm_head.weight).
Every projection is a plain nn.Linear child, so quantisation can swap them and LoRA can wrap them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mlc.kernels import native
from mlc.models import native_decode
from mlc.models.config import ModelConfig
from mlc.models.kvcache import AttentionCache, causal_attention
from mlc.models.rope import RotaryTable, apply_rope


def _without_autograd(*tensors: torch.Tensor) -> bool:
    """Whether nothing here needs gradients, so a native kernel (no autograd) may compute the result."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


NATIVE_NORM_MAX_ROWS = 64  # more rows (prefill) amortise torch's per-op cost and use its threads


def _few_bf16_rows(x: torch.Tensor) -> bool:
    """Whether x is a decode step's few bf16 rows on a CPU, where mlc's native kernels beat torch's per-op cost."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() <= NATIVE_NORM_MAX_ROWS * x.shape[-1]


class Linear(nn.Linear):
    """nn.Linear, with a faster path for one row of half-precision input on CPU (a decode step at batch 1).

    torch's CPU GEMM for a single bf16 row is slow: F.linear of a 1536x576 bf16 weight took 67 us here
    against 34 us for torch.mv on the same weight, and a SmolLM2 decode step went from 46 to 36 ms.
    Without autograd, a bf16 row goes to mlc's AVX512_BF16 kernel where the CPU has one (kernels/native).
    fp32, several rows and GPUs take F.linear as before. Being an nn.Linear, quantisation swaps it and
    peft wraps it like any other.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and x.numel() == x.shape[-1]:
            y = None
            if x.dtype == torch.bfloat16 and _without_autograd(x, self.weight):
                y = native.gemv_bf16(self.weight, x.reshape(-1))
            if y is None:
                y = torch.mv(self.weight, x.reshape(-1))
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], y.shape[0])
        if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and _without_autograd(x, self.weight):
            return _row_bucketed_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


# Rows of a half-precision CPU product are padded up to a multiple of this. oneDNN, torch's bf16 CPU GEMM, builds and
# keeps a kernel for every distinct row count it sees: a server whose steps hold every number of tokens from 1 to 512
# grew by 350 MB on one 1536x576 weight (27 MB padded), and a new row count costs 0.65 ms of JIT (1.65 against
# 1.00 ms per product). Padding keeps 32 shapes up to 512 rows; the extra rows cost nothing measurable (1.14 ms
# padded against 1.18 ms unpadded once cached). Rows are independent, so the kept rows are the unpadded product's.
ROW_BUCKET = 16


def _row_bucketed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    pad = -rows % ROW_BUCKET
    if not pad or torch.compiler.is_compiling():  # a compiled graph has its own shapes
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    padded = torch.cat([flat, flat.new_zeros(pad, flat.shape[1])])
    return F.linear(padded, weight, bias)[:rows].view(*x.shape[:-1], weight.shape[0])


def stacked_linear(*parts: nn.Module) -> nn.Module | None:
    """One Linear whose output is the parts' outputs side by side (their weights and biases stacked).

    Integer-quantised parts of one setting stack into one quantised Linear. None for anything else
    (other quantised kinds, LoRA-wrapped projections): those keep their own modules.
    """
    if not all(type(m) is Linear for m in parts):
        from mlc.kernels.quant_linear import stacked_int_linear

        return stacked_int_linear(list(parts))
    first = parts[0]
    # Built on the meta device: a random initialisation of the stacked weight, overwritten at once, cost 6 s at 1B.
    fused = Linear(first.in_features, sum(m.out_features for m in parts), bias=first.bias is not None, device="meta")
    grad = first.weight.requires_grad
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat([m.weight for m in parts]), requires_grad=grad)
        if fused.bias is not None:
            fused.bias = nn.Parameter(torch.cat([m.bias for m in parts]), requires_grad=grad)
    return fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        if _few_bf16_rows(x) and _without_autograd(x, self.weight):
            y = native.rms_norm_bf16(x, self.weight, self.eps)  # a decode step: one call instead of seven ops
            if y is not None:
                return y
        # Half precision: normalise in fp32, round, then scale, in transformers' order, so bf16 logits agree.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + h, this norm of it): a residual connection and the norm after it, in one native call for a decode step.

        Elsewhere, and when hooks watch this module (upcycle's router reads its outputs), the sum and a call of the
        module, as before.
        """
        if _few_bf16_rows(x) and _without_autograd(x, h, self.weight) and not (self._forward_hooks or self._forward_pre_hooks):
            both = native.add_rms_norm_bf16(x, h, self.weight, self.eps)
            if both is not None:
                return both
        x = x + h
        return x, self(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.window = config.layer_window(layer_idx)
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = Linear(hidden, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.v_proj = Linear(hidden, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, hidden, bias=config.o_bias)

    def fuse_qkv(self) -> bool:
        """Replace q/k/v_proj by one Linear over their stacked weights (inference only; see fuse_projections)."""
        fused = stacked_linear(self.q_proj, self.k_proj, self.v_proj)
        if fused is None:
            return False
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj
        return True

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: AttentionCache | None = None
    ) -> torch.Tensor:
        b, t, _ = x.shape
        if hasattr(self, "qkv_proj"):
            qkv = self.qkv_proj(x)
            # A cache that can rotate, store and attend in one go from the projection (a decode step of the serving
            # engine: kernels/decode_attention.py) says so by an output; otherwise the steps below.
            attend_projected = getattr(cache, "attend_projected", None)
            if attend_projected is not None:
                out = attend_projected(self.layer_idx, qkv, cos, sin, self.n_heads, sliding_window=self.window)
                if out is not None:
                    return self.o_proj(out)
            # Heads of q, k and v side by side: one rotation covers the q and k heads together.
            qkv = qkv.view(b, t, self.n_heads + 2 * self.n_kv, self.head_dim).transpose(1, 2)
            q, k = apply_rope(qkv[:, : self.n_heads + self.n_kv], cos, sin).split([self.n_heads, self.n_kv], dim=1)
            v = qkv[:, self.n_heads + self.n_kv :]
        else:
            # Head counts from the projections' outputs: under tensor parallelism each process holds whole heads, a
            # tp_size-th of them (mlc.distributed.parallel), and the same code runs on its share.
            q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = causal_attention(q, k, v, self.window)
        else:
            out = cache.attend(self.layer_idx, q, k, v, sliding_window=self.window)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with Llama/Qwen names."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def fuse_gate_up(self) -> bool:
        """Replace gate_proj and up_proj by one Linear over their stacked weights (inference only)."""
        fused = stacked_linear(self.gate_proj, self.up_proj)
        if fused is None:
            return False
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate_up = self.gate_up_proj(x)
            if _few_bf16_rows(gate_up) and _without_autograd(gate_up):
                act = native.silu_mul_bf16(gate_up)  # a decode step: one call instead of three ops
                if act is not None:
                    return self.down_proj(act)
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


native_decode.register_module_types(MLP, RMSNorm)


class MixtralExpert(nn.Module):
    """SwiGLU with Mixtral's names: w1 = gate, w3 = up, w2 = down."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = Linear(hidden, intermediate, bias=False)
        self.w2 = Linear(intermediate, hidden, bias=False)
        self.w3 = Linear(hidden, intermediate, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Experts(nn.ModuleList):
    """A SparseMoE's routed experts, held in memory (a ModuleList: experts.<i>.<name> are the checkpoint's names).

    `mix` is the one place the experts run, so a module with the same method can stand in for this one:
    serve's --expert-offload swaps in one that reads experts from disk through a cache (serve/expert_cache.py).
    """

    def mix(self, flat: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum over slots of weights * expert(x) for each row of flat (tokens, hidden); chosen, weights: (tokens, top_k)."""
        out = torch.zeros_like(flat)
        # Loop over the experts that got tokens: each runs once on its tokens, as in transformers. The sums go in
        # ascending expert order (floating-point addition of three or more terms depends on their order).
        for e in chosen.unique().tolist():
            token, slot = torch.where(chosen == e)
            y = self[e](flat[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


class SparseMoE(nn.Module):
    """Top-k routed experts (softmax, then top-k), plus Qwen2-MoE's sigmoid-gated shared expert."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, n = config.hidden_size, config.num_experts
        self.top_k = config.num_experts_per_tok
        self.normalize = config.model_type == "mixtral" or config.norm_topk_prob
        self.jitter = config.router_jitter_noise
        self.gate = Linear(hidden, n, bias=False)
        if config.model_type == "mixtral":
            self.experts = Experts(MixtralExpert(hidden, config.intermediate_size) for _ in range(n))
        else:
            self.experts = Experts(MLP(hidden, config.moe_intermediate_size) for _ in range(n))
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP(hidden, config.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, router logits of shape (tokens, experts)) for x of shape (batch, seq, hidden)."""
        shape = x.shape
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        flat = x.reshape(-1, shape[-1])
        router_logits = self.gate(flat)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts.mix(flat, chosen, weights)
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.view(shape), router_logits


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The feed-forward module's name is part of the checkpoint format: Mixtral calls it block_sparse_moe.
        self.ffn_name = "block_sparse_moe" if config.model_type == "mixtral" else "mlp"
        if config.layer_is_sparse(layer_idx):
            ffn: nn.Module = SparseMoE(config)
        else:
            ffn = MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        setattr(self, self.ffn_name, ffn)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: AttentionCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, router logits or None for a dense layer)."""
        # An int4 layer of a decode step: one native call (native_decode.py). Not in a graph being compiled (ctypes).
        if getattr(cache, "fused_decode", False) and not torch.compiler.is_compiling():
            out = native_decode.decode_layer(self, x, cos, sin, cache)
            if out is not None:
                return out, None
        x, normed = self.post_attention_layernorm.add_and_norm(x, self.self_attn(self.input_layernorm(x), cos, sin, cache))
        out = getattr(self, self.ffn_name)(normed)
        if isinstance(out, tuple):
            out, router_logits = out
            return x + out, router_logits
        return x + out, None


class Transformer(nn.Module):
    """Embeddings, decoder layers and the final norm (transformers' LlamaModel)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope = RotaryTable(config)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (batch, seq or logits_to_keep, vocab); None with skip_logits
    hidden_states: list[torch.Tensor] | None = None  # embeddings, then each layer's output; the last is normed
    router_logits: list[torch.Tensor] | None = None  # one (tokens, experts) tensor per sparse layer
    last_hidden_state: torch.Tensor | None = None  # the final normed hidden states, always set


class CausalLM(nn.Module):
    """A language model: model (Transformer) + lm_head, HF names. Decoder blocks are model.layers[i]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Transformer(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the output head when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
        output_hidden_states: bool = False,
        output_router_logits: bool = False,
        logits_to_keep: int = 0,
        skip_logits: bool = False,
    ) -> ModelOutput:
        """Run the model on input_ids (batch, seq).

        position_ids default to 0..seq-1, or to what the cache says comes next. logits_to_keep=N
        computes logits for the last N positions only (0 = all): generation needs just the last.
        skip_logits leaves out the head entirely (for chunked losses or hidden-state features).
        """
        if position_ids is None:
            if cache is not None:
                position_ids = cache.positions(input_ids)
            else:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rope.cos_sin(position_ids, x.dtype)
        hidden = [x] if output_hidden_states else None
        routers: list[torch.Tensor] | None = [] if output_router_logits else None
        for layer in self.model.layers:
            x, router_logits = layer(x, cos, sin, cache)
            if hidden is not None:
                hidden.append(x)
            if routers is not None and router_logits is not None:
                routers.append(router_logits)
        x = self.model.norm(x)
        if hidden is not None:
            hidden[-1] = x  # as in transformers: the last hidden state is the normed one
        logits = None
        if not skip_logits:
            kept = x[:, -logits_to_keep:] if logits_to_keep else x
            # The head sees a 2-D input: for a strided 3-D slice whose weights do not require grad
            # (inference mode, frozen or quantised models) matmul falls back to bmm and copies the
            # whole transposed head weight on every call.
            logits = self.lm_head(kept.reshape(-1, kept.shape[-1])).view(kept.shape[0], kept.shape[1], -1)
        return ModelOutput(logits, hidden, routers, x)


def fuse_projections(model: nn.Module) -> int:
    """Stack each attention's q/k/v and each dense MLP's gate/up weights into one Linear, in place.

    For inference only (the serving engine): the model then runs 4 matmuls per layer instead of 7, which
    matters at batch 1 on a CPU, where each small matmul has a fixed cost. The model's state_dict changes
    names, so a fused model is not saved. Integer-quantised projections stack too; other quantised kinds
    and LoRA-wrapped projections are left as they are.
    Returns how many modules were fused.
    """
    fused = 0
    for module in model.modules():
        if isinstance(module, Attention):
            fused += module.fuse_qkv()
        elif isinstance(module, MLP):
            fused += module.fuse_gate_up()
    return fused
