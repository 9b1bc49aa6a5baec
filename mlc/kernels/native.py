"""Small C kernels, compiled on first use for the CPU they run on and loaded with ctypes.

torch's CPU kernels cover almost everything mlc needs; this covers the spots of a bf16 decode step
where they are far from the hardware (gemv_bf16.c, see benchmarks/RESULTS.md): the matrix-vector
product (faster than torch.mv on AVX512_BF16 CPUs), RMSNorm of a few rows (one call instead of
torch's seven small ops), with the residual sum before it, and SwiGLU's silu(gate) * up; a paged decode step's
attention with its RoPE and cache write (decode_attention.c, see decode_attention.py); and int4 (quant_int4.c): the decode product straight from torch's int4 tiles,
and for prefill, dequantising those tiles to bf16 in one pass for the GEMM. The library is built with the system C compiler
(`cc -O3 -march=native`, under a second) into the mlc cache, keyed by the source, the compiler and
the CPU, so a cache shared between machines never runs code built for another CPU. Where it cannot
be built (no compiler, no AVX512_BF16, MLC_NATIVE_KERNELS=0) callers fall back to torch, and the
reason is kept in `unavailable_reason()`. The decode products are also torch operators (mlc::gemv_bf16,
mlc::int4pack_mm_bf16), which is how graphs built by torch.compile call them.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import threading
from pathlib import Path

import torch

from mlc.kernels.cbuild import cached_library, find_compiler

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(f) for f in ("gemv_bf16.c", "quant_int4.c", "decode_attention.c"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_state: dict[str, object] = {}


@functools.lru_cache(maxsize=1)
def _cpu_identity() -> str:
    """The CPU's model and feature flags: what -march=native compiles for."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags")
    lines = [line for line in text.splitlines() if line.split(":")[0].strip() in wanted]
    return "\n".join(dict.fromkeys(lines))


def _has_avx512_bf16() -> bool:
    return "avx512_bf16" in _cpu_identity().split()


def _load() -> ctypes.CDLL | None:
    if os.environ.get("MLC_NATIVE_KERNELS", "1") == "0":
        _state["reason"] = "disabled by MLC_NATIVE_KERNELS=0"
        return None
    if platform.machine() not in ("x86_64", "AMD64") or not _has_avx512_bf16():
        _state["reason"] = "the CPU has no AVX512_BF16"
        return None
    compiler = find_compiler()
    if compiler is None:
        _state["reason"] = "no C compiler (cc or gcc) on PATH"
        return None
    try:
        target = cached_library(compiler, "gemv_bf16", SOURCES, FLAGS, key_extra=[_cpu_identity()])
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as e:
        _state["reason"] = f"could not build {', '.join(f.name for f in SOURCES)}: {e}"
        log.warning("native kernels unavailable, using torch: %s", _state["reason"])
        return None
    fn = lib.mlc_gemv_bf16
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    fn.restype = None
    fn = lib.mlc_rms_norm_bf16
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float]
    fn.restype = None
    fn = lib.mlc_add_rms_norm_bf16
    fn.argtypes = [*[ctypes.c_void_p] * 5, ctypes.c_int64, ctypes.c_int64, ctypes.c_float]
    fn.restype = None
    fn = lib.mlc_silu_mul_bf16
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    fn.restype = None
    fn = lib.mlc_decode_attention_bf16
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, ctypes.c_float, ptr,
                   ctypes.c_int]
    fn.restype = None
    fn = lib.mlc_decode_layer_int4
    fn.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ctypes.c_float, ctypes.c_float, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64,
                   ptr, i64, i64, i64, i64, ctypes.c_float, ctypes.c_int]
    fn.restype = None
    fn = lib.mlc_dequant_int4pack_t
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 5, ctypes.c_int]
    fn.restype = None
    fn = lib.mlc_int4pack_mm_bf16
    fn.argtypes = [*[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 4, ctypes.c_int, ctypes.c_int]
    fn.restype = None
    return lib


def _library() -> ctypes.CDLL | None:
    if torch.compiler.is_compiling():  # a compiled graph cannot call into ctypes: custom ops (below) or torch's ops instead
        return None
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    return _library() is not None


def unavailable_reason() -> str | None:
    _library()
    return _state.get("reason")  # type: ignore[return-value]


def gemv_bf16(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """weight [N, K] @ x [K] for contiguous bf16 CPU tensors, as a bf16 [N]; None where the kernel is not available.

    No autograd: callers use it for inference only. In a graph being compiled it is the custom op mlc::gemv_bf16
    (this kernel at run time, torch.mv where the kernel is missing), so compiled steps keep it too.
    """
    if torch.compiler.is_compiling():
        return torch.ops.mlc.gemv_bf16(weight, x)
    return _gemv_bf16(weight, x)


def _gemv_bf16(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    lib = _library()
    if lib is None or not weight.is_contiguous() or not x.is_contiguous():
        return None
    n, k = weight.shape
    y = torch.empty(n, dtype=torch.bfloat16)
    lib.mlc_gemv_bf16(weight.data_ptr(), x.data_ptr(), y.data_ptr(), n, k, torch.get_num_threads())
    return y


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm over the last dimension of a contiguous bf16 CPU x with a bf16 weight; None where not available.

    Rounds like transformers' bf16 order (normalise in fp32, round, scale, round). No autograd.
    """
    lib = _library()
    if lib is None or not x.is_contiguous() or weight.dtype != torch.bfloat16 or not weight.is_contiguous():
        return None
    dim = x.shape[-1]
    y = torch.empty_like(x)
    lib.mlc_rms_norm_bf16(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // dim, dim, eps)
    return y


def add_rms_norm_bf16(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x + h, RMSNorm of it) for contiguous bf16 CPU x and h of one shape and a bf16 weight; None where not available.

    The sum is rounded to bf16 as torch's add is, the norm as rms_norm_bf16. No autograd.
    """
    lib = _library()
    if lib is None or not (x.is_contiguous() and h.is_contiguous() and weight.is_contiguous()) or weight.dtype != torch.bfloat16 \
            or h.dtype != torch.bfloat16 or h.shape != x.shape:
        return None
    dim = x.shape[-1]
    total, y = torch.empty_like(x), torch.empty_like(x)
    lib.mlc_add_rms_norm_bf16(x.data_ptr(), h.data_ptr(), weight.data_ptr(), total.data_ptr(), y.data_ptr(), x.numel() // dim, dim, eps)
    return total, y


def silu_mul_bf16(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for a contiguous bf16 CPU gate_up [..., 2 * inter] (gate, then up): [..., inter] bf16, rounded at
    each step as torch's silu and mul are; None where not available. No autograd."""
    lib = _library()
    if lib is None or not gate_up.is_contiguous():
        return None
    inter = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], inter)
    lib.mlc_silu_mul_bf16(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * inter), inter)
    return out


def decode_attention_bf16(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, write_slots: torch.Tensor, slot_table: torch.Tensor, lens: torch.Tensor,
                          q_heads: int, window: int | None) -> torch.Tensor | None:
    """decode_attention.py's fused decode attention (see there for the arguments) by mlc_decode_attention_bf16; None
    where the kernel is not available. The caller has checked dtypes, layouts and sizes (decode_attention.supported)."""
    lib = _library()
    if lib is None:
        return None
    b = lens.shape[0]
    hkv, slots, d = k_cache.shape
    out = qkv.new_empty(1, b, q_heads * d)
    lib.mlc_decode_attention_bf16(qkv.data_ptr(), qkv.stride(-2), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
                                  v_cache.data_ptr(), slots, write_slots.data_ptr(), slot_table.data_ptr(),
                                  slot_table.numel() // b, lens.data_ptr(), b, q_heads, hkv, d, window or 0, d**-0.5,
                                  out.data_ptr(), torch.get_num_threads())
    return out


def decode_layer_int4(x: torch.Tensor, ln1: int, ln2: int, eps1: float, eps2: float, weights: ctypes.Array,
                      cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, write_slots: torch.Tensor,
                      slot_table: torch.Tensor, lens: torch.Tensor, q_heads: int, window: int | None) -> torch.Tensor | None:
    """A decoder layer's output (x's shape) for b decode rows x (1, b, hidden) of an int4 model by mlc_decode_layer_int4
    (models/native_decode.py checks what it takes); None where the kernel is not available.

    ln1, ln2: addresses of the two RMSNorm weights (bf16); weights: 24 int64, (tiles address, scales_and_zeros address,
    n, k, group, has_zero) of the q/k/v, o, gate/up and down products; the rest as decode_attention_bf16 takes it.
    """
    lib = _library()
    if lib is None:
        return None
    b, hidden = x.shape[1], x.shape[2]
    hkv, slots, d = k_cache.shape
    out = torch.empty_like(x)
    lib.mlc_decode_layer_int4(x.data_ptr(), out.data_ptr(), b, hidden, ln1, ln2, eps1, eps2, weights, cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
                              v_cache.data_ptr(), slots, write_slots.data_ptr(), slot_table.data_ptr(), slot_table.numel() // b,
                              lens.data_ptr(), q_heads, hkv, d, window or 0, d**-0.5, torch.get_num_threads())
    return out


def dequant_int4pack_t(tiles: torch.Tensor, scales_zeros: torch.Tensor, n: int, k: int, group: int, r0: int, r1: int,
                       out: torch.Tensor) -> torch.Tensor | None:
    """W^T as a bf16 [K, r1 - r0] view of the buffer out, for rows r0..r1 (multiples of 64) of torch's CPU int4 tiles;
    None where the kernel is not available. scales_zeros is the int4 kernel's bf16 [K/G, N, 2]; out a flat bf16 buffer."""
    lib = _library()
    if lib is None or not (tiles.is_contiguous() and scales_zeros.is_contiguous() and out.is_contiguous()):
        return None
    if scales_zeros.dtype != torch.bfloat16 or out.dtype != torch.bfloat16 or r0 % 64 or r1 % 64 or out.numel() < k * (r1 - r0):
        return None
    lib.mlc_dequant_int4pack_t(tiles.data_ptr(), scales_zeros.data_ptr(), out.data_ptr(), n, k, group, r0, r1, torch.get_num_threads())
    return out[: k * (r1 - r0)].view(k, r1 - r0)


def int4pack_mm_bf16(x: torch.Tensor, tiles: torch.Tensor, scales_zeros: torch.Tensor, group: int, has_zero: bool) -> torch.Tensor:
    """x [M, K] @ W^T as bf16 [M, N] from torch's CPU int4 tiles (the decode product): mlc_int4pack_mm_bf16 where the
    kernel is available, torch's `_weight_int4pack_mm_for_cpu` otherwise.

    scales_zeros is the int4 kernel's bf16 [K/G, N, 2]; has_zero=False skips the zero terms (all zero). No autograd.
    In a graph being compiled it is the custom op mlc::int4pack_mm_bf16, which makes the same choice at run time.
    """
    if torch.compiler.is_compiling():
        return torch.ops.mlc.int4pack_mm_bf16(x, tiles, scales_zeros, group, has_zero)
    return _int4pack_mm_bf16(x, tiles, scales_zeros, group, has_zero)


def _int4pack_mm_bf16(x: torch.Tensor, tiles: torch.Tensor, scales_zeros: torch.Tensor, group: int, has_zero: bool) -> torch.Tensor:
    # Each torch call here costs about a microsecond and a decode step makes a few hundred of these products.
    if x.dtype != torch.bfloat16 or not x.is_contiguous():
        x = x.to(torch.bfloat16).contiguous()
    lib = _state["lib"] if "lib" in _state else _library()
    if lib is None or not (tiles.is_contiguous() and scales_zeros.is_contiguous()) or group % 2 or group > 256:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, tiles, group, scales_zeros)
    m, k = x.shape
    n = scales_zeros.shape[1]
    y = torch.empty(m, n, dtype=torch.bfloat16)
    lib.mlc_int4pack_mm_bf16(tiles.data_ptr(), scales_zeros.data_ptr(), x.data_ptr(), y.data_ptr(), m, n, k, group, int(has_zero),
                             torch.get_num_threads())
    return y


# The kernels as torch operators, for graphs torch.compile builds: a compiled graph cannot trace into ctypes, and the
# operator keeps the native kernel in the compiled step (where it is missing, the operator runs torch's own op).
# torch.library.Library's plain CPU kernel costs less per call than torch.library.custom_op's wrapper (about 8
# against 15 us here), which matters at a few hundred products per decode step.
_ops = torch.library.Library("mlc", "FRAGMENT")
_ops.define("gemv_bf16(Tensor weight, Tensor x) -> Tensor")
_ops.define("int4pack_mm_bf16(Tensor x, Tensor tiles, Tensor scales_zeros, int group, bool has_zero) -> Tensor")


def _gemv_bf16_op(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    y = _gemv_bf16(weight, x)
    return y if y is not None else torch.mv(weight, x)


_ops.impl("gemv_bf16", _gemv_bf16_op, "CPU")
_ops.impl("int4pack_mm_bf16", _int4pack_mm_bf16, "CPU")


@torch.library.register_fake("mlc::gemv_bf16", lib=_ops)
def _(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return weight.new_empty(weight.shape[0])


@torch.library.register_fake("mlc::int4pack_mm_bf16", lib=_ops)
def _(x: torch.Tensor, tiles: torch.Tensor, scales_zeros: torch.Tensor, group: int, has_zero: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], scales_zeros.shape[1], dtype=torch.bfloat16)


# ---- int4 repack at load (int4_repack.c): portable C, its own library, so it builds on any CPU with a compiler ----
REPACK_SOURCES = (Path(__file__).with_name("int4_repack.c"),)


def _load_repack() -> ctypes.CDLL | None:
    if os.environ.get("MLC_NATIVE_KERNELS", "1") == "0":
        return None
    compiler = find_compiler()
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(cached_library(compiler, "int4_repack", REPACK_SOURCES, FLAGS, key_extra=[_cpu_identity()])))
    except (OSError, RuntimeError) as e:
        log.warning("native int4 repack unavailable, using torch: %s", e)
        return None
    lib.mlc_int4pack_from_words.argtypes = [ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_int]
    lib.mlc_int4pack_from_words.restype = None
    return lib


def int4pack_from_words(words: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    """torch's CPU int4 tiles (uint8 [N, K/2]) from compressed-tensors 4-bit int32 words [N, >= K/8]; None where the
    kernel cannot be built. N % 64 == 0 and K % 8 == 0 (packing.int4pack_from_words checks)."""
    if "repack" not in _state:
        with _lock:
            if "repack" not in _state:
                _state["repack"] = _load_repack()
    lib = _state["repack"]
    if lib is None or words.dtype != torch.int32 or not words.is_contiguous() or words.device.type != "cpu":
        return None
    tiles = torch.empty(n, k // 2, dtype=torch.uint8)
    lib.mlc_int4pack_from_words(words.data_ptr(), tiles.data_ptr(), n, k, words.shape[-1], torch.get_num_threads())  # type: ignore[attr-defined]
    return tiles
