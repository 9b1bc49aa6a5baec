"""Round-to-nearest quantisers: int8/int4 (per channel or group, symmetric or not), fp8 e4m3, NF4/FP4 code books.

Scales are rounded to their stored dtype (bf16) before the integers are computed, so the stored
scale is the one the integers were rounded against.
"""

from __future__ import annotations

import torch

from mlc.kernels.quant_weights import CODEBOOKS, CodebookWeight, Fp8Weight, IntWeight

SCALE_DTYPE = torch.bfloat16
FP8_MAX = 448.0  # largest finite float8 e4m3fn


def groups_of(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[N, K] -> [N, K/G, G] (one group spanning K when group_size is None)."""
    n, k = w.shape
    g = group_size or k
    return w.reshape(n, k // g, g)


def int_params(
    w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale [N, groups] (bf16) and integer zero point [N, groups] (None if symmetric)."""
    wg = groups_of(w.float(), group_size)
    levels = 2**bits - 1
    if symmetric:
        # Half a level more than the positive side reaches, as compressed-tensors' min-max observer:
        # the most negative weight maps to -2^(b-1) exactly and the most positive rounds down to 2^(b-1) - 1.
        scale = wg.abs().amax(dim=-1) / (levels / 2)
        return _safe(scale).to(SCALE_DTYPE), None
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = _safe((hi - lo) / levels).to(SCALE_DTYPE)
    qmin = -(2 ** (bits - 1))
    zero_point = torch.clamp(torch.round(-lo / scale.float()) + qmin, qmin, 2 ** (bits - 1) - 1)
    return scale, zero_point.to(torch.int8)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """An all-zero group gets scale 1 (any scale represents it exactly) instead of a division by zero."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def round_int(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int, group_size: int | None
) -> torch.Tensor:
    """Signed integers q [N, K] = clamp(round(w / scale) + zero_point) for the given per-group parameters."""
    wg = groups_of(w.float(), group_size)
    q = torch.round(wg / scale.float().unsqueeze(-1))
    if zero_point is not None:
        q = q + zero_point.float().unsqueeze(-1)
    q = q.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q.reshape(w.shape).to(torch.int8)


def quantize_int(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> IntWeight:
    """Round-to-nearest integer quantisation of a [N, K] weight."""
    scale, zero_point = int_params(w, bits, group_size, symmetric)
    return IntWeight(round_int(w, scale, zero_point, bits, group_size), scale, zero_point, bits, group_size)


def quantize_fp8(w: torch.Tensor) -> Fp8Weight:
    """float8 e4m3 with a per-output-channel scale mapping each row's absmax to 448."""
    scale = _safe(w.float().abs().amax(dim=1, keepdim=True) / FP8_MAX)
    value = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Fp8Weight(value, scale)


def codebook_tensor(name: str) -> torch.Tensor:
    return torch.tensor(sorted(CODEBOOKS[name]), dtype=torch.float32)


def nearest_code(normalised: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code book entry (code book sorted ascending) for every element."""
    # 15 vectorised comparisons beat torch.bucketize several times over on CPU.
    codes = torch.zeros(normalised.shape, dtype=torch.uint8)
    for midpoint in ((codebook[1:] + codebook[:-1]) / 2).tolist():
        codes += normalised > midpoint
    return codes


def quantize_codebook(w: torch.Tensor, name: str, group_size: int) -> CodebookWeight:
    """Blockwise absmax code book quantisation (QLoRA's NF4): w ~ codebook[code] * absmax of the block."""
    codebook = codebook_tensor(name)
    wg = groups_of(w.float(), group_size)
    scale = _safe(wg.abs().amax(dim=-1)).to(SCALE_DTYPE)
    codes = nearest_code(wg / scale.float().unsqueeze(-1), codebook)
    return CodebookWeight(codes.reshape(w.shape), codebook, scale, None, group_size, name)
