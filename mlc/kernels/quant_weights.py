"""Quantised weights as plain data: what a scheme produces, a format stores and a kernel computes with.

Each kind has one `dequantize()`, written as the formula, which is the reference that every fast
kernel path is tested against. Shapes follow nn.Linear: a weight is [out_features N, in_features K].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The QLoRA NormalFloat-4 code book (2305.14314, appendix E): quantiles of N(0, 1) scaled to [-1, 1],
# with an exact zero. Both tables are in bitsandbytes' code order (code i has value i), so its 4-bit
# serialisation stores mlc's codes as they are. FP4 is bitsandbytes' own: 1 sign, 2 exponent and 1
# mantissa bit with a subnormal 0.0625 (not OCP e2m1's 0.5), normalised to a maximum of 1.
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
FP4_CODEBOOK = tuple(
    s * v / 12.0 for s in (1.0, -1.0) for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
)
CODEBOOKS = {"nf4": NF4_CODEBOOK, "fp4": FP4_CODEBOOK}


def _per_group(values: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """[N, groups] -> [N, K]: each group's value repeated over its columns."""
    return values.repeat_interleave(group_size, dim=1)[:, :k]


@dataclass
class IntWeight:
    """Affine integers, compressed-tensors semantics: w = (q - zero_point) * scale, per channel or per group."""

    q: torch.Tensor  # int8 [N, K], signed, in [-2^(b-1), 2^(b-1) - 1]
    scale: torch.Tensor  # [N, groups] (groups = 1 per channel)
    zero_point: torch.Tensor | None  # int8 [N, groups], None when symmetric
    bits: int
    group_size: int | None  # None: one scale per output channel

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.q.shape
        g = self.group_size or k
        q = self.q.to(torch.float32)
        if self.zero_point is not None:
            q = q - _per_group(self.zero_point.to(torch.float32), g, k)
        return (q * _per_group(self.scale.to(torch.float32), g, k)).to(dtype)

    def storage_bits(self) -> int:
        """Bits this weight takes on disk: packed values, scales and zero points."""
        bits = self.q.numel() * self.bits + self.scale.numel() * self.scale.element_size() * 8
        if self.zero_point is not None:
            bits += self.zero_point.numel() * self.bits
        return bits


@dataclass
class CodebookWeight:
    """4-bit codes into a 16-entry code book, per group: w = codebook[code] * scale + zero (DAQ adds the zero)."""

    codes: torch.Tensor  # uint8 [N, K], 0..15
    codebook: torch.Tensor  # float32 [16]
    scale: torch.Tensor  # [N, groups]
    zero: torch.Tensor | None  # [N, groups], None for plain absmax scaling
    group_size: int
    name: str  # "nf4" or "fp4"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.codes.shape
        w = self.codebook.to(torch.float32)[self.codes.long()] * _per_group(self.scale.to(torch.float32), self.group_size, k)
        if self.zero is not None:
            w = w + _per_group(self.zero.to(torch.float32), self.group_size, k)
        return w.to(dtype)

    def storage_bits(self) -> int:
        bits = self.codes.numel() * 4 + self.scale.numel() * self.scale.element_size() * 8 + 16 * 32
        if self.zero is not None:
            bits += self.zero.numel() * self.zero.element_size() * 8
        return bits


@dataclass
class Fp8Weight:
    """float8 e4m3 values with one scale per output channel: w = value * scale."""

    value: torch.Tensor  # float8_e4m3fn [N, K]
    scale: torch.Tensor  # [N, 1]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.value.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.value.to(torch.float32) * self.scale.to(torch.float32)).to(dtype)

    def storage_bits(self) -> int:
        return self.value.numel() * 8 + self.scale.numel() * self.scale.element_size() * 8


@dataclass
class OutlierInt8Weight:
    """LLM.int8(): int8 rows (absmax per output row) for ordinary input features, 16-bit columns for outliers.

    w[:, c] = q[:, c] * scale for c not in outlier_cols; w[:, outlier_cols] = outlier_weight.
    At run time the activations' ordinary features are also quantised to 8 bits, per row (vector-wise):
    with a zero point (the row's range [min, max] in 255 steps) when activation_zero_point is set,
    else symmetric (absmax / 127).
    """

    q: torch.Tensor  # int8 [N, K], zero in the outlier columns
    scale: torch.Tensor  # [N, 1]
    outlier_cols: torch.Tensor  # int64 [n_outliers], sorted
    outlier_weight: torch.Tensor  # 16-bit [N, n_outliers]
    activation_zero_point: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.q.to(torch.float32) * self.scale.to(torch.float32)
        w[:, self.outlier_cols] = self.outlier_weight.to(torch.float32)
        return w.to(dtype)

    def storage_bits(self) -> int:
        n = self.outlier_cols.numel()
        return (
            self.q.numel() * 8
            + self.scale.numel() * self.scale.element_size() * 8
            + n * 64
            + self.outlier_weight.numel() * self.outlier_weight.element_size() * 8
        )


QuantWeight = IntWeight | CodebookWeight | Fp8Weight | OutlierInt8Weight
