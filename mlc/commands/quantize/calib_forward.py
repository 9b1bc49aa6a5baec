"""LLM.int8's calibration forward of a dense decoder block in a few fused passes (calib_kernels.c), with its statistic.

LLM.int8's statistic is max |x| per input feature of every Linear. The block's module forward gets it through
forward hooks and spends most of its non-GEMM time in torch's bf16 elementwise ops and CPU flash attention: on
SmolLM2-135M (benchmarks/RESULTS.md, issue 17) the GEMMs took 55% of the calibration, the attention 24%, RMSNorm's fp32
round trip 5%, the other elementwise ops 11% and the statistic 3%. Here the GEMMs stay torch's (F.linear on the
block's own weights) and the rest is four native passes, each also taking the maximum of what it writes:

    x -> RMSNorm (max: q/k/v's input) -> q, k, v GEMMs -> RoPE + causal attention (max: o_proj's input) -> o GEMM
      -> residual + RMSNorm (max: gate/up's input) -> gate, up GEMMs -> SiLU * up (max: down_proj's input)
      -> down GEMM -> residual

The arithmetic is the module's op for op in bf16, but sums run in another order (and the attention's exp is
another polynomial), so a value can differ in its last bf16 bit; an input feature whose max |x| sits at the
6.0 threshold can then change sides. `fused_block` returns None where the block is not a plain dense one
(experts, sliding windows, fused projections, quantised Linears, a head size not a multiple of 32) or the
kernels cannot be built (no compiler, no AVX512_BF16, MLC_NATIVE_KERNELS=0): the caller then runs the module.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mlc.kernels.cbuild import cached_library, find_compiler

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("calib_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
LIBS = ["-lm"]

# The Linears of a dense block by the tensor whose maximum they share.
GROUPS = {
    "self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv", "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate_up", "mlp.up_proj": "gate_up", "mlp.down_proj": "down",
}

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_identity() -> str:
    """The CPU's model and feature flags: what -march=native compiles for (part of the build's cache key)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags")]
    return "\n".join(dict.fromkeys(lines))


def _load() -> ctypes.CDLL | None:
    if os.environ.get("MLC_NATIVE_KERNELS", "1") == "0":
        _state["reason"] = "disabled by MLC_NATIVE_KERNELS=0"
        return None
    cpu = _cpu_identity()
    if platform.machine() not in ("x86_64", "AMD64") or "avx512_bf16" not in cpu.split():
        _state["reason"] = "the CPU has no AVX512_BF16"
        return None
    compiler = find_compiler()
    if compiler is None:
        _state["reason"] = "no C compiler (cc or gcc) on PATH"
        return None
    try:
        lib = ctypes.CDLL(str(cached_library(compiler, "calib_kernels", [SOURCE], FLAGS, LIBS, key_extra=[cpu])))
    except (OSError, RuntimeError) as e:
        _state["reason"] = f"could not build {SOURCE.name}: {e}"
        log.warning("calibration kernels unavailable, using torch: %s", _state["reason"])
        return None
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.mlc_calib_add_rms_norm.argtypes = [p, p, p, p, p, p, i64, i64, f32, i32]
    lib.mlc_calib_silu_mul.argtypes = [p, p, p, p, i64, i64, i32]
    lib.mlc_calib_attention.argtypes = [p, p, p, p, p, p, p, *[i64] * 8, f32, i32]
    for fn in (lib.mlc_calib_add_rms_norm, lib.mlc_calib_silu_mul, lib.mlc_calib_attention):
        fn.restype = i32
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (the reason is in `unavailable_reason()`)."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    library()
    return _state.get("reason")  # type: ignore[return-value]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(code: int) -> None:
    if code != 0:
        raise MemoryError("the calibration kernels could not allocate their scratch memory")


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 amax: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, RMSNorm(h)) for h = x + residual (or x), rows of contiguous bf16 [n, dim]; amax (fp32 [dim]) takes max |RMSNorm(h)|."""
    lib = library()
    assert lib is not None
    h = torch.empty_like(x) if residual is not None else x
    y = torch.empty_like(x)
    _check(lib.mlc_calib_add_rms_norm(x.data_ptr(), _ptr(residual), _ptr(h) if residual is not None else None, weight.data_ptr(),
                                      y.data_ptr(), _ptr(amax), x.shape[0], x.shape[1], eps, torch.get_num_threads()))
    return h, y


def silu_mul(gate: torch.Tensor, up: torch.Tensor, amax: torch.Tensor | None) -> torch.Tensor:
    """silu(gate) * up for contiguous bf16 [n, dim]; amax (fp32 [dim]) takes max |result|."""
    lib = library()
    assert lib is not None
    y = torch.empty_like(gate)
    _check(lib.mlc_calib_silu_mul(gate.data_ptr(), up.data_ptr(), y.data_ptr(), _ptr(amax), gate.shape[0], gate.shape[1],
                                  torch.get_num_threads()))
    return y


def rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: int,
                   head_dim: int, amax: torch.Tensor | None) -> torch.Tensor:
    """Causal attention of `batch` sequences from position 0 with RoPE applied to q and k first.

    q [batch * t, heads * head_dim], k and v [batch * t, kv_heads * head_dim] (bf16, rows contiguous), cos and signed
    sin [t, head_dim] bf16 (mlc.models.rope). Returns [batch * t, heads * head_dim] bf16, o_proj's input; amax (fp32
    [heads * head_dim]) takes its max |x|.
    """
    lib = library()
    assert lib is not None
    n = q.shape[0]
    t = n // batch
    out = torch.empty(n, q.shape[1], dtype=torch.bfloat16)
    _check(lib.mlc_calib_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), _ptr(amax),
                                   batch, t, q.shape[1] // head_dim, k.shape[1] // head_dim, head_dim, q.stride(0), k.stride(0),
                                   v.stride(0), head_dim**-0.5, torch.get_num_threads()))
    return out


class FusedBlock:
    """A dense decoder block's calibration forward: (x [b, t, hidden], maxima by group, need_output, out) -> its output.

    maxima maps the groups of GROUPS to fp32 tensors that take the running max |x| of that group's input; a group
    left out is not reduced. Without need_output the forward stops after down_proj's statistic. out, a contiguous
    tensor shaped like x, receives the output instead of a new tensor.
    """

    def __init__(self, layer: nn.Module, cos: torch.Tensor, sin: torch.Tensor):
        attn, mlp = layer.self_attn, layer.mlp
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate, self.up, self.down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.head_dim = attn.head_dim
        self.cos, self.sin = cos.reshape(-1, self.head_dim).contiguous(), sin.reshape(-1, self.head_dim).contiguous()

    def __call__(self, x: torch.Tensor, maxima: dict[str, torch.Tensor], need_output: bool,
                 out: torch.Tensor | None = None) -> torch.Tensor | None:
        b, t, hidden = x.shape
        flat = x.reshape(b * t, hidden)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        _, xn = add_rms_norm(flat, None, self.norm1.weight, self.norm1.eps, maxima.get("qkv"))
        q, k, v = (F.linear(xn, m.weight, m.bias) for m in (self.q, self.k, self.v))
        del xn
        att = rope_attention(q, k, v, self.cos[:t], self.sin[:t], b, self.head_dim, maxima.get("o"))
        del q, k, v
        o = F.linear(att, self.o.weight, self.o.bias)
        del att
        h, xn = add_rms_norm(flat, o, self.norm2.weight, self.norm2.eps, maxima.get("gate_up"))
        del o
        gate, up = F.linear(xn, self.gate.weight, self.gate.bias), F.linear(xn, self.up.weight, self.up.bias)
        del xn
        act = silu_mul(gate, up, maxima.get("down"))
        del gate, up
        if not need_output:
            return None
        down = F.linear(act, self.down.weight, self.down.bias)
        if out is None:
            return torch.add(h, down).view(b, t, hidden)
        torch.add(h, down, out=out.view(b * t, hidden))
        return out


def fused_block(layer: nn.Module, cos: torch.Tensor, sin: torch.Tensor) -> FusedBlock | None:
    """The fused forward of a plain dense bf16 decoder block (cos, sin: the block's RoPE table for positions 0..t-1), or None."""
    from mlc.models.transformer import MLP, Attention, DecoderLayer, Linear, RMSNorm

    if type(layer) is not DecoderLayer or type(getattr(layer, "mlp", None)) is not MLP or type(layer.self_attn) is not Attention:
        return None
    attn, mlp = layer.self_attn, layer.mlp
    if attn.window is not None or hasattr(attn, "qkv_proj") or hasattr(mlp, "gate_up_proj"):
        return None
    linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    if not all(type(m) is Linear and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu" for m in linears):
        return None
    if not all(type(m) is RMSNorm and m.weight.dtype == torch.bfloat16 and m.weight.is_contiguous() for m in norms):
        return None
    d = attn.head_dim
    heads, kv_heads = attn.q_proj.out_features // d, attn.k_proj.out_features // d
    if d % 32 or d > 512 or kv_heads == 0 or heads % kv_heads or attn.v_proj.out_features != kv_heads * d:
        return None
    hidden, inner = attn.q_proj.in_features, mlp.gate_proj.out_features
    if hidden % 16 or inner % 16 or attn.o_proj.in_features != heads * d:
        return None
    if cos.dtype != torch.bfloat16 or cos.shape[-1] != d or sin.shape != cos.shape:
        return None
    if library() is None:
        return None
    return FusedBlock(layer, cos, sin)
