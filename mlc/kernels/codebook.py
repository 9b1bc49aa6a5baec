"""Blockwise absmax code book quantisation (NF4/FP4, QLoRA 2305.14314): the quantiser that `mlc quantize --scheme nf4`
and `mlc train`'s QLoRA base share. Scales are rounded to their stored dtype (bf16) before the codes are chosen, so
the stored scale is the one the codes were picked against.
"""

from __future__ import annotations

import torch

from mlc.kernels.quant_weights import CODEBOOKS, CodebookWeight

SCALE_DTYPE = torch.bfloat16


def groups_of(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[N, K] -> [N, K/G, G] (one group spanning K when group_size is None)."""
    n, k = w.shape
    g = group_size or k
    return w.reshape(n, k // g, g)


def safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """An all-zero group gets scale 1 (any scale represents it exactly) instead of a division by zero."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


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
    """Blockwise absmax code book quantisation (QLoRA's NF4): w ~ codebook[code] * absmax of the block.

    Codes index the code book in its own (bitsandbytes') order, so bitsandbytes' layout stores them as they are.
    """
    table = torch.tensor(CODEBOOKS[name], dtype=torch.float32)
    order = torch.argsort(table, stable=True)  # position in the sorted code book -> code
    wg = groups_of(w.float(), group_size)
    scale = safe_scale(wg.abs().amax(dim=-1)).to(SCALE_DTYPE)
    codes = order[nearest_code(wg / scale.float().unsqueeze(-1), table[order]).long()].to(torch.uint8)
    return CodebookWeight(codes.reshape(w.shape), table, scale, None, group_size, name)
