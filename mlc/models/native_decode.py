"""A decoder layer of an int4 model's decode step in one native call (decode_attention.c's mlc_decode_layer_int4).

At batch 1 a small model's decode step is mostly fixed costs: SmolLM2's 30 layers each made about ten module calls and
a dozen native or torch calls, each with its Python and dispatch overhead, around products that take a few
microseconds. For a layer of the common form (RMSNorm, fused q/k/v, o, fused gate/up and down as int4 IntLinears
on torch's tiles, no biases, no hooks) of a decode-only step over the paged store (PagedBatch.fused_decode), the
whole layer runs in C instead: the same kernels in the same order as the module path, so the same bits
(tests/models/test_native_decode.py), in one OpenMP parallel region. Anything else returns None and the modules run as usual.
"""

from __future__ import annotations

import ctypes

import torch

from mlc.kernels import decode_attention, native
from mlc.kernels.quant_linear import PREFILL_ROWS, IntLinear

# The exact module types (not subclasses, whose forward may differ) whose work the layer kernel does: the dense SwiGLU
# MLP and RMSNorm of models/transformer.py, which registers them at import (it imports this module, so this one does not
# import it back).
_MODULE_TYPES: dict[str, type] = {}


def register_module_types(mlp: type, norm: type) -> None:
    _MODULE_TYPES.update(mlp=mlp, norm=norm)


def _int4(m: object) -> list[int] | None:
    """(tiles, scales_and_zeros, n, k, group, has_zero) of an int4 IntLinear the layer kernel can run, else None."""
    if type(m) is not IntLinear or m.path != "int4pack" or m.exact or m.bias is not None:
        return None
    g = m.group_size
    if g % 2 or g > 256 or not (m._tiles.is_contiguous() and m._scales_and_zeros.is_contiguous()):
        return None
    return [m._tiles.data_ptr(), m._scales_and_zeros.data_ptr(), m.out_features, m.in_features, g, int(m.zero_point is not None)]


def _parts(layer: torch.nn.Module) -> tuple | None:
    """(attention, ffn, norm 1, norm 2, q/k/v, o, gate/up, down) of the layer, read from the module dicts (a decode step
    asks 30 times, and nn.Module's attribute lookup costs a microsecond each); None without fused projections."""
    mods = layer._modules
    attn, ffn = mods["self_attn"], mods[layer.ffn_name]
    a, f = attn._modules, ffn._modules
    if "qkv_proj" not in a or "gate_up_proj" not in f:
        return None
    return attn, ffn, mods["input_layernorm"], mods["post_attention_layernorm"], a["qkv_proj"], a["o_proj"], f["gate_up_proj"], f["down_proj"]


def _key(parts: tuple) -> tuple:
    """What the plan's pointers depend on: the modules, the int4 tensors a device move or cast would replace, and the
    norm weights' storage (a cast swaps a parameter's data in place)."""
    *_, ln1, ln2, qkv, o, gu, dn = parts
    int4 = [getattr(m, name, None) for m in (qkv, o, gu, dn) for name in ("_tiles", "_scales_and_zeros", "zero_point", "exact")]
    w1, w2 = ln1._parameters["weight"], ln2._parameters["weight"]
    return (*parts, *int4, w1.data_ptr(), w1.dtype, w2.data_ptr(), w2.dtype)


def _same(a: tuple, b: tuple) -> bool:
    """Whether two keys hold the same objects: tensors by identity (== on tensors compares elements, and a tuple's !=
    would raise on it), everything else by value."""
    return len(a) == len(b) and all(x is y or (not isinstance(x, torch.Tensor) and x == y) for x, y in zip(a, b))


def _plan(layer: torch.nn.Module, parts: tuple) -> tuple | None:
    """The kernel's per-layer arguments (int4 weights as a ctypes array, norm weights, eps, heads, window, layer index),
    or None where the layer is not of the form the kernel takes."""
    attn, ffn, ln1, ln2, *linears = parts
    norm = _MODULE_TYPES.get("norm")
    if type(ffn) is not _MODULE_TYPES.get("mlp") or type(ln1) is not norm or type(ln2) is not norm:
        return None
    if ln1.weight.dtype != torch.bfloat16 or ln2.weight.dtype != torch.bfloat16 or not (ln1.weight.is_contiguous() and ln2.weight.is_contiguous()):
        return None
    weights = [_int4(m) for m in linears]
    if any(w is None for w in weights) or weights[0][2] != (attn.n_heads + 2 * attn.n_kv) * attn.head_dim:
        return None
    if not decode_attention.supported(attn.head_dim, attn.n_kv, attn.n_heads):
        return None
    array = (ctypes.c_int64 * 24)(*[v for w in weights for v in w])
    return array, ln1.weight.data_ptr(), ln2.weight.data_ptr(), ln1.eps, ln2.eps, attn.n_heads, attn.window, attn.layer_idx


def decode_layer(layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: object) -> torch.Tensor | None:
    """The layer's output for x (1, b, hidden), b decode rows of a PagedBatch with fused_decode; None where it does not apply."""
    if x.shape[1] >= PREFILL_ROWS or x.dtype != torch.bfloat16 or cos.dtype != torch.bfloat16 or (torch.is_grad_enabled() and x.requires_grad):
        return None
    parts = _parts(layer)
    if parts is None or any(m._forward_hooks or m._forward_pre_hooks for m in (layer, *parts)):
        return None
    key = _key(parts)
    cached = layer.__dict__.get("_native_decode_plan")
    if cached is None or not _same(cached[0], key):
        cached = (key, _plan(layer, parts))
        layer.__dict__["_native_decode_plan"] = cached  # the key holds the tensors the pointers point into
    plan = cached[1]
    if plan is None:
        return None
    weights, ln1, ln2, eps1, eps2, hq, window, idx = plan
    kc, vc = cache.store.k[idx], cache.store.v[idx]
    if kc.shape[0] * kc.shape[2] * 2 + hq * kc.shape[2] != weights[2] or not (x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()):
        return None
    return native.decode_layer_int4(x, ln1, ln2, eps1, eps2, weights, cos, sin, kc, vc, cache.write_slots, cache.decode_gather,
                                    cache.decode_lens, hq, window)


def runs_every_layer(model: torch.nn.Module) -> bool:
    """Whether every decoder layer of model runs a decode step of fewer than PREFILL_ROWS rows as one native call
    (fused int4 layers of the form above, the native kernels built), so that a compiled graph has nothing to gain there."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers or not native.available():
        return False
    for layer in layers:
        parts = _parts(layer)
        if parts is None or any(m._forward_hooks or m._forward_pre_hooks for m in (layer, *parts)) or _plan(layer, parts) is None:
            return False
    return True
