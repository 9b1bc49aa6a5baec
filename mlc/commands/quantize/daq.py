"""DAQ (2410.12187): density-aware scale and zero point for NF4/FP4 code books.

1. Density-centric alignment: centre each group's range on the midpoint of its 2.5% and 97.5%
   quantiles (where the weights are dense), with scale 0.9 * max |w - centre| / max |code|.
2. Dynamic range adjustment: sign-of-finite-difference steps on the zero point and on the scale
   that lower the group's output error on calibration activations, ||X_g (w_g - w^_g)||^2 =
   d^T H_g d with H_g the group's diagonal block of X^T X. A step is taken only when it lowers the
   loss, so every group ends no worse than where alignment put it.
"""

from __future__ import annotations

import torch

from mlc.commands.quantize.rtn import SCALE_DTYPE, _safe, codebook_tensor, groups_of, nearest_code
from mlc.kernels.quant_weights import CodebookWeight

LOW_QUANTILE, HIGH_QUANTILE = 0.025, 0.975
INITIAL_RANGE = 0.9
STEPS = 12
FIRST_STEP, STEP_DECAY = 0.1, 0.7  # relative step sizes: 0.1, 0.07, ... down to ~0.002


def _reconstruct(wg: torch.Tensor, codebook: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    codes = nearest_code((wg - zero.unsqueeze(-1)) / scale.unsqueeze(-1), codebook)
    return codebook[codes.long()] * scale.unsqueeze(-1) + zero.unsqueeze(-1)


def _group_loss(delta: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """d^T H_g d for every [N, groups] group: delta [N, groups, G], blocks [groups, G, G]."""
    d = delta.transpose(0, 1)  # [groups, N, G]
    return (torch.bmm(d, blocks) * d).sum(-1).transpose(0, 1)


def diagonal_blocks(hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """[groups, G, G]: the blocks of a [K, K] matrix on its diagonal."""
    k = hessian.shape[0]
    n = k // group_size
    return hessian.view(n, group_size, n, group_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def quantize_daq(w: torch.Tensor, name: str, group_size: int, hessian: torch.Tensor) -> CodebookWeight:
    """Code book quantisation of w [N, K] with DAQ's aligned and tuned per-group scale and zero."""
    codebook = codebook_tensor(name)
    wg = groups_of(w.float(), group_size)
    blocks = diagonal_blocks(hessian.float(), group_size)
    flat = wg.reshape(-1, group_size)
    q = torch.quantile(flat, torch.tensor([LOW_QUANTILE, HIGH_QUANTILE]), dim=1)
    zero = ((q[0] + q[1]) / 2).view(wg.shape[:2])
    scale = _safe(INITIAL_RANGE * (wg - zero.unsqueeze(-1)).abs().amax(-1) / codebook.abs().max())

    def loss(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return _group_loss(_reconstruct(wg, codebook, s, z) - wg, blocks)

    best = loss(scale, zero)
    step = FIRST_STEP
    for _ in range(STEPS):
        for move in ("zero", "scale"):
            for sign in (1.0, -1.0):
                if move == "zero":
                    s, z = scale, zero + sign * step * scale
                else:
                    s, z = scale * (1.0 + sign * step), zero
                trial = loss(s, z)
                better = trial < best
                scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
                best = torch.where(better, trial, best)
        step *= STEP_DECAY
    scale, zero = _safe(scale).to(SCALE_DTYPE), zero.to(SCALE_DTYPE)
    codes = nearest_code((wg - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1), codebook)
    return CodebookWeight(codes.reshape(w.shape), codebook, scale, zero, group_size, name)
