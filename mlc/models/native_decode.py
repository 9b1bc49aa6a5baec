"""A decoder layer of an int4 model's decode step in one native call (decode_attention.c's mlc_decode_layer_int4).

At batch 1 a small model's decode step is mostly fixed costs: SmolLM2's 30 layers each made about ten module calls and
a dozen native or torch calls, each with its Python and dispatch overhead, around products that take a few
microseconds. For a layer of the common form (RMSNorm, fused q/k/v, o, fused gate/up and down as int4 IntLinears
on torch's tiles, no biases, no hooks) of a decode-only step over the paged store (PagedBatch.fused_decode), the
whole layer runs in C instead: the same kernels in the same order as the module path, so the same bits
(tests/kernels), in one OpenMP parallel region. Anything else returns None and the modules run as usual.
"""

from __future__ import annotations

import torch

from mlc.kernels import decode_attention, native
from mlc.kernels.quant_linear import PREFILL_ROWS, IntLinear


def _int4(m: object) -> list[int] | None:
    """(tiles, scales_and_zeros, n, k, group, has_zero) of an int4 IntLinear the layer kernel can run, else None."""
    if type(m) is not IntLinear or m.path != "int4pack" or m.exact or m.bias is not None or m._forward_hooks or m._forward_pre_hooks:
        return None
    g = m.group_size
    if g % 2 or g > 256 or not (m._tiles.is_contiguous() and m._scales_and_zeros.is_contiguous()):
        return None
    return [m._tiles.data_ptr(), m._scales_and_zeros.data_ptr(), m.out_features, m.in_features, g, int(m.zero_point is not None)]


def decode_layer(layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: object) -> torch.Tensor | None:
    """The layer's output for x (1, b, hidden), b decode rows of a PagedBatch with fused_decode; None where it does not apply."""
    from mlc.models.transformer import MLP, RMSNorm

    attn, mlp = layer.self_attn, getattr(layer, layer.ffn_name)
    ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
    b = x.shape[1]
    if b >= PREFILL_ROWS or x.dtype != torch.bfloat16 or cos.dtype != torch.bfloat16:
        return None
    if type(mlp) is not MLP or not hasattr(mlp, "gate_up_proj") or not hasattr(attn, "qkv_proj"):
        return None
    if type(ln1) is not RMSNorm or type(ln2) is not RMSNorm or ln1.weight.dtype != torch.bfloat16 or ln2.weight.dtype != torch.bfloat16:
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in (layer, attn, mlp, ln1, ln2)) or (torch.is_grad_enabled() and x.requires_grad):
        return None
    weights = [_int4(attn.qkv_proj), _int4(attn.o_proj), _int4(mlp.gate_up_proj), _int4(mlp.down_proj)]
    if any(w is None for w in weights):
        return None
    kc, vc = cache.store.k[attn.layer_idx], cache.store.v[attn.layer_idx]
    hkv, _, d = kc.shape
    hq = attn.n_heads
    if weights[0][2] != (hq + 2 * hkv) * d or not decode_attention.supported(d, hkv, hq):
        return None
    if not (x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()):
        return None
    return native.decode_layer_int4(x, ln1.weight, ln2.weight, ln1.eps, ln2.eps, [v for w in weights for v in w], cos, sin, kc, vc,
                                    cache.write_slots, cache.decode_gather, cache.decode_lens, hq, attn.window)
