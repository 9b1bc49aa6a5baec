"""Round-to-nearest quantisers: int8/int4 (per channel or group, symmetric or not), fp8 e4m3, NF4/FP4 code books.

Scales are rounded to their stored dtype (bf16) before the integers are computed, so the stored
scale is the one the integers were rounded against.
"""

from __future__ import annotations

import torch

# The code book quantiser lives with the kernels (mlc train's QLoRA quantises its base with it too); the
# redundant aliases re-export it here for the quantisers and tests that import it from this module.
from mlc.kernels.codebook import SCALE_DTYPE as SCALE_DTYPE
from mlc.kernels.codebook import codebook_tensor as codebook_tensor
from mlc.kernels.codebook import groups_of as groups_of
from mlc.kernels.codebook import nearest_code as nearest_code
from mlc.kernels.codebook import quantize_codebook as quantize_codebook
from mlc.kernels.codebook import safe_scale as _safe
from mlc.kernels.quant_weights import Fp8Weight, IntWeight

FP8_MAX = 448.0  # largest finite float8 e4m3fn


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
