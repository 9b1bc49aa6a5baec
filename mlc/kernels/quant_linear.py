"""Linear layers that compute with quantised weights, each on the fastest path its device has.

A quantised model is the same model with these modules in place of nn.Linear (as in gpt-fast).
On CPU (measured in benchmarks/quant_matmul.py, recorded in benchmarks/RESULTS.md):
- decode (few rows): torch's packed kernel `_weight_int8pack_mm` for int8, fed bf16 activations (fp32
  activations make it 15-40x slower); for int4, mlc's native kernel on torch's int4 tiles (quant_int4.c,
  1.2x torch's `_weight_int4pack_mm_for_cpu` at 1B shapes on a quiet machine, which stays the fallback;
  benchmarks/int4_decode.py);
- prefill (PREFILL_ROWS rows and up): dequantise the weight blockwise to bf16 and use the bf16 GEMM
  (AMX/AVX-512 where the CPU has them), several times faster than the packed kernels at M=256. int4
  dequantises a block of rows at a time in one pass with a native kernel (quant_int4.c), so the block
  is still in cache for its GEMM: 1.2-1.6x a bf16 GEMM on a 4096x11008 layer at M=256.
Weights with no packed kernel (code books, fp8, odd shapes, CUDA) take the blockwise dequantise path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from mlc.kernels import native, packing
from mlc.kernels.quant_weights import CodebookWeight, Fp8Weight, IntWeight, OutlierInt8Weight, QuantWeight

PREFILL_ROWS = 16  # rows from which blockwise dequantise + bf16 GEMM beats the packed kernels on CPU
DEQUANT_BLOCK = 1 << 22  # weight elements dequantised per step of the blockwise path (8 MiB of bf16)
INT4_PREFILL_BLOCK = 1 << 22  # int4 prefill with the native kernel: weight elements per block (8 MiB of bf16); fewer, larger blocks keep the threads in step
INT4_KERNEL_GROUPS = (32, 64, 128, 256)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """bf16 on CPU (the fast GEMM there); the activations' own dtype on accelerators."""
    return torch.bfloat16 if x.device.type == "cpu" else x.dtype


def _blockwise(x: torch.Tensor, n: int, dequant_rows: Callable[[int, int, torch.dtype], torch.Tensor], align: int = 1) -> torch.Tensor:
    """x [M, K] @ W.T where W's rows are dequantised a block at a time (a multiple of align rows), never all at once for big W."""
    dtype = _compute_dtype(x)
    xd = x.to(dtype)
    rows = max(align, DEQUANT_BLOCK // x.shape[1] // align * align)
    if n <= rows:
        return xd @ dequant_rows(0, n, dtype).T
    out = torch.empty(x.shape[0], n, dtype=dtype, device=x.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        torch.matmul(xd, dequant_rows(r0, r1, dtype).T, out=out[:, r0:r1])
    return out


class QuantLinear(nn.Module):
    """nn.Linear's interface over a quantised weight; subclasses hold the weight in their kernel's layout.

    The kernel layout depends on the device, so a device move goes through the plain QuantWeight:
    `.to(device)` re-lays the weight for the new device.
    """

    path: str  # which kernel path forward takes: "int8pack", "int4pack", "dequant", ...

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        # exact: compute in fp32 with the dequantised weight (the quality reference), not the fast path.
        self.exact = False
        self._load(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = self._reference(x2) if self.exact else self._matmul(x2)
        if y.dtype != x.dtype:  # (skipping a no-op cast saves a microsecond per call of a decode step)
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out, in] this module computes with."""
        return self.quant_weight().dequantize(dtype)

    def _apply(self, fn, recurse=True):  # torch's signature, untyped
        super()._apply(fn, recurse)
        kept = [v for v in vars(self).values() if isinstance(v, torch.Tensor)]
        if all(fn(t) is t for t in kept):  # a move that moves nothing (.to("cpu") on CPU): no unpack and re-lay
            return self
        w = self.quant_weight()
        moved = type(w)(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in vars(w).items()})
        self._load(moved)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, path={self.path}"

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.dequantize(torch.float32).T

    # Subclasses: lay out the weight for its device; give it back as plain data; multiply.
    def _load(self, weight: QuantWeight) -> None:
        raise NotImplementedError

    def quant_weight(self) -> QuantWeight:
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Int4Tiles:
    """An int4 weight already in torch's CPU int4 tiles (packing.int4pack_from_words), for IntLinear to take as is.

    The model loader builds these from the stored words, and stacked_int_linear from its parts' tiles, so neither
    materialises the [N, K] values that an IntWeight holds. scales_and_zeros: the kernel's [K/G, N, 2], when known.
    """

    tiles: torch.Tensor  # uint8 [N, K/2], torch's tile order
    scale: torch.Tensor  # [N, K/G]
    zero_point: torch.Tensor | None  # int8 [N, K/G], None when symmetric
    shape: tuple[int, int]
    group_size: int
    scales_and_zeros: torch.Tensor | None = None

    bits = 4


def takes_int4pack(shape: tuple[int, int], bits: int, group_size: int | None, device: torch.device) -> bool:
    """Whether an int weight of this shape and setting runs on torch's CPU int4 kernel (so it is held as tiles)."""
    n, k = shape
    return (device.type == "cpu" and bits == 4 and group_size in INT4_KERNEL_GROUPS and k % group_size == 0
            and n % packing.TILE_N == 0 and packing.int4pack_layout_known())


def int4_scales_and_zeros(scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """The int4 kernel's bf16 scales_and_zeros [K/G, N, 2]: it computes (u - 8) * scale + zero from unsigned u = q + 8."""
    scale = scale.to(torch.float32)
    out = torch.empty(scale.shape[1], scale.shape[0], 2, dtype=torch.bfloat16)
    out[..., 0] = scale.T
    if zero_point is None:
        out[..., 1] = 0
    else:
        out[..., 1] = (-zero_point.to(torch.float32) * scale).T
    return out


class IntLinear(QuantLinear):
    """Affine integer weights (int8 per channel, int4 per group, symmetric or not); built from an IntWeight, or for
    int4 from its tiles (Int4Tiles)."""

    def _load(self, w: IntWeight | Int4Tiles) -> None:
        n, k = w.shape
        self.bits, self.group_size = w.bits, w.group_size
        self.scale, self.zero_point = w.scale, w.zero_point  # small; kept to give the weight back exactly
        if isinstance(w, Int4Tiles):
            self.path, self.q, self._tiles = "int4pack", None, w.tiles
            sz = w.scales_and_zeros
            self._scales_and_zeros = int4_scales_and_zeros(w.scale, w.zero_point) if sz is None else sz
            return
        cpu = w.q.device.type == "cpu"
        if cpu and w.bits == 8 and w.symmetric and w.group_size is None:
            self.path = "int8pack"
            self.q = w.q.contiguous()
            self._scale_bf16 = w.scale.reshape(n).to(torch.bfloat16)
        elif takes_int4pack((n, k), w.bits, w.group_size, w.q.device):
            self.path = "int4pack"
            self.q = None
            self._tiles = packing.int4pack_cpu(w.q.to(torch.int32) + 8)
            self._scales_and_zeros = int4_scales_and_zeros(w.scale, w.zero_point)
        else:
            self.path = "dequant"
            self.q = w.q.contiguous()

    def quant_weight(self) -> IntWeight:
        q = self.q
        if self.path == "int4pack":
            q = (packing.unpack_int4pack_cpu(self._tiles, self.out_features, self.in_features).to(torch.int8) - 8)
        return IntWeight(q, self.scale, self.zero_point, self.bits, self.group_size)

    def _dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        k, g = self.in_features, self.group_size or self.in_features
        if self.path == "int4pack":
            # Only the 64-row tiles that hold rows r0..r1 are unpacked (not the whole weight per block).
            t0, t1 = r0 // packing.TILE_N, -(-r1 // packing.TILE_N)
            tiles = self._tiles.view(-1, k, packing.TILE_N // 2)[t0:t1]
            u = packing.unpack_int4pack_cpu(tiles, (t1 - t0) * packing.TILE_N, k)[r0 - t0 * packing.TILE_N : r1 - t0 * packing.TILE_N]
            sz = self._scales_and_zeros[:, r0:r1].transpose(0, 1)  # [rows, K/G, 2]
            w = (u.to(dtype) - 8).view(r1 - r0, k // g, g) * sz[..., :1].to(dtype) + sz[..., 1:].to(dtype)
            return w.view(r1 - r0, k)
        q = self.q[r0:r1].to(dtype)
        if self.zero_point is not None:
            q = q - self.zero_point[r0:r1].to(dtype).repeat_interleave(g, dim=1)[:, :k]
        return q * self.scale[r0:r1].to(dtype).repeat_interleave(g, dim=1)[:, :k]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        decode = x.shape[0] < PREFILL_ROWS
        if self.path == "int8pack":
            if decode:
                return torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.q, self._scale_bf16)
            # Per-channel scale commutes with the GEMM: scale the [M, N] output, not the [N, K] weight.
            return _blockwise(x, self.out_features, lambda r0, r1, dt: self.q[r0:r1].to(dt)) * self._scale_bf16
        if self.path == "int4pack" and decode:
            return native.int4pack_mm_bf16(x, self._tiles, self._scales_and_zeros, self.group_size, self.zero_point is not None)
        if self.path == "int4pack":
            y = self._int4_prefill_native(x)
            if y is not None:
                return y
        return _blockwise(x, self.out_features, self._dequant_rows, packing.TILE_N if self.path == "int4pack" else 1)

    def _int4_prefill_native(self, x: torch.Tensor) -> torch.Tensor | None:
        """x @ W.T a cache-sized block of rows at a time, each dequantised by the native kernel; None without it."""
        n, k = self.out_features, self.in_features
        rows = max(packing.TILE_N, INT4_PREFILL_BLOCK // k // packing.TILE_N * packing.TILE_N)
        buffer = torch.empty(k * min(rows, n), dtype=torch.bfloat16)
        xd = x.to(torch.bfloat16)
        out = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            wt = native.dequant_int4pack_t(self._tiles, self._scales_and_zeros, n, k, self.group_size, r0, r1, buffer)
            if wt is None:
                return None
            torch.matmul(xd, wt, out=out[:, r0:r1])
        return out


class CodebookLinear(QuantLinear):
    """NF4/FP4 code books (with DAQ's zero points): no packed kernel exists, so always blockwise dequantise."""

    path = "dequant"

    def _load(self, w: CodebookWeight) -> None:
        self.codes = packing.pack_nibbles(w.codes)
        self.codebook, self.scale, self.zero = w.codebook.to(torch.float32), w.scale, w.zero
        self.group_size, self.name = w.group_size, w.name

    def quant_weight(self) -> CodebookWeight:
        return CodebookWeight(packing.unpack_nibbles(self.codes), self.codebook, self.scale, self.zero, self.group_size, self.name)

    def _dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        k, g = self.in_features, self.group_size
        codes = packing.unpack_nibbles(self.codes[r0:r1]).long()
        w = self.codebook.to(dtype)[codes].view(r1 - r0, k // g, g) * self.scale[r0:r1, :, None].to(dtype)
        if self.zero is not None:
            w = w + self.zero[r0:r1, :, None].to(dtype)
        return w.view(r1 - r0, k)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return _blockwise(x, self.out_features, self._dequant_rows)


class Fp8Linear(QuantLinear):
    """float8 e4m3 with per-channel scales: dequantise blockwise, scale the output."""

    path = "dequant"

    def _load(self, w: Fp8Weight) -> None:
        self.value, self.scale = w.value, w.scale
        # fp8 -> bf16 is exact; a 256-entry table is faster on CPU than torch's scalar conversion.
        self._table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).to(w.value.device)

    def quant_weight(self) -> Fp8Weight:
        return Fp8Weight(self.value, self.scale)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.value.view(torch.uint8)
        y = _blockwise(x, self.out_features, lambda r0, r1, dt: self._table.to(dt)[bits[r0:r1].long()])
        return y * self.scale.reshape(-1).to(y.dtype)


class OutlierInt8Linear(QuantLinear):
    """LLM.int8(): int8 x int8 for ordinary features (activations quantised per row), 16-bit for outliers."""

    def _load(self, w: OutlierInt8Weight) -> None:
        self.q, self.scale = w.q.contiguous(), w.scale
        self.outlier_cols, self.outlier_weight = w.outlier_cols, w.outlier_weight
        self.activation_zero_point = w.activation_zero_point
        self.path = "int_mm" if w.q.device.type == "cpu" else "dequant"
        self._scale_bf16 = w.scale.reshape(-1).to(torch.bfloat16)
        self._q_row_sums = w.q.to(torch.int32).sum(dim=1)  # undoes the int8 shift of zero-point activations

    def quant_weight(self) -> OutlierInt8Weight:
        return OutlierInt8Weight(self.q, self.scale, self.outlier_cols, self.outlier_weight, self.activation_zero_point)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, exact=True)

    def _matmul(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        x = x.float()
        outliers = x[:, self.outlier_cols] @ self.outlier_weight.float().T
        ordinary = x.index_fill(1, self.outlier_cols, 0.0)
        xq, row_scale, shift = self._quantise_rows(ordinary)
        if exact or self.path == "dequant":
            acc = xq @ self.q.float().T * self.scale.reshape(-1).float()
        elif x.shape[0] < PREFILL_ROWS:
            # Integers up to 255 in magnitude are exact in bf16 and the kernel accumulates in fp32: the same
            # integer dot products, without the int8 shift.
            acc = torch._weight_int8pack_mm(xq.to(torch.bfloat16), self.q, self._scale_bf16).float()
        else:
            dots = torch._int_mm((xq + shift).to(torch.int8), self.q.T)
            if self.activation_zero_point:
                dots = dots - shift.to(torch.int32) * self._q_row_sums
            acc = dots.float() * self.scale.reshape(-1).float()
        return acc * row_scale + outliers

    def _quantise_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
        """(integer-valued xq, row scale, int8 shift): x ~ xq * scale per row, and xq + shift fits int8.

        Absmax: xq in [-127, 127], no shift. Zero point (LLM.int8's "zeropoint" variant, its best on
        small models): the row's range [min(x, 0), max(x, 0)] in 255 steps, so a skewed row gets up to
        twice the resolution; xq lies in [-zero, 255 - zero] and shifts into int8 by zero - 128.
        """
        if not self.activation_zero_point:
            row_scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
            return torch.round(x / row_scale), row_scale, 0
        lo = x.amin(dim=1, keepdim=True).clamp(max=0.0)
        hi = x.amax(dim=1, keepdim=True).clamp(min=0.0)
        row_scale = ((hi - lo) / 255.0).clamp_min(1e-12)
        zero = torch.round(-lo / row_scale)
        xq = torch.minimum(torch.maximum(torch.round(x / row_scale), -zero), 255.0 - zero)
        return xq, row_scale, zero - 128.0


MODULES: dict[type, type[QuantLinear]] = {
    IntWeight: IntLinear,
    CodebookWeight: CodebookLinear,
    Fp8Weight: Fp8Linear,
    OutlierInt8Weight: OutlierInt8Linear,
}


def quant_linear(weight: QuantWeight, bias: torch.Tensor | None = None) -> QuantLinear:
    """The module that computes with this quantised weight on its device's fastest path."""
    return MODULES[type(weight)](weight, bias)


def stacked_int_linear(parts: list[nn.Module]) -> IntLinear | None:
    """One IntLinear whose output is the parts' outputs side by side; None unless all are alike IntLinears.

    The parts' integer weights, scales and zero points are stacked along the output dimension and laid
    out afresh, so the stacked module takes the same kernel path as each part would (for int4, when the
    parts' rows fill whole kernel tiles).
    """
    if not parts or not all(type(m) is IntLinear and not m.exact for m in parts):
        return None
    first = parts[0]
    def setting(m: IntLinear) -> tuple:
        return m.path, m.bits, m.group_size, m.zero_point is None, m.in_features, m.bias is None

    if any(setting(m) != setting(first) for m in parts):
        return None
    # Stacked from what the parts hold, never unpacked: int4 tiles are whole 64-row blocks, so the stacked tiles are
    # the parts' tiles one after another, and the kernel's scales_and_zeros [K/G, N, 2] stack along N.
    scale = torch.cat([m.scale for m in parts])
    zero_point = None if first.zero_point is None else torch.cat([m.zero_point for m in parts])
    bias = torch.cat([m.bias for m in parts]) if first.bias is not None else None
    shape = (sum(m.out_features for m in parts), first.in_features)
    if first.path == "int4pack":
        weight: IntWeight | Int4Tiles = Int4Tiles(torch.cat([m._tiles for m in parts]), scale, zero_point, shape, first.group_size,
                                                  torch.cat([m._scales_and_zeros for m in parts], dim=1))
    else:
        weight = IntWeight(torch.cat([m.q for m in parts]), scale, zero_point, first.bits, first.group_size)
    fused = IntLinear(weight, bias)
    return fused if fused.path == first.path else None
