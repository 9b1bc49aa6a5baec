"""GPTQ (Frantar et al. 2022, 2210.17323): quantise a weight column by column, pushing each column's
rounding error onto the columns not yet quantised through the inverse Hessian of the layer's inputs.

H = X^T X over the calibration tokens (X: the layer's inputs). The algorithm works on the upper
Cholesky factor of H^-1 in blocks of columns (lazy batch updates). With act-order, columns go in
order of decreasing H diagonal (the most active inputs first); the group parameters are then fixed
up front from the original weights (static groups), so the stored layout stays the plain
contiguous-groups layout that compressed-tensors, vLLM and mlc's kernels read.
"""

from __future__ import annotations

import torch

from mlc.commands.quantize.rtn import int_params
from mlc.kernels.quant_weights import IntWeight

DAMPING = 0.01  # of the mean Hessian diagonal, added to the diagonal (the paper's 1%)
BLOCK = 128


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1, with 10x more damping each time H is too ill-conditioned."""
    mean_diag = torch.diagonal(h).mean()
    damping = DAMPING
    for _ in range(4):
        damped = h.clone()
        damped.diagonal().add_(damping * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inverse_lower, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return inverse_lower
        damping *= 10
    raise ValueError("the layer's input Hessian is not positive definite even with 10x damping: calibrate on more text")


def quantize_gptq(
    w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, act_order: bool = False
) -> IntWeight:
    """GPTQ-quantise w [N, K] given H = X^T X [K, K] (any positive scaling of it gives the same result)."""
    w = w.detach().float().clone()
    n, k = w.shape
    h = hessian.detach().float().clone()
    dead = torch.diagonal(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    g = group_size or k
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    static = act_order or group_size is None
    if static:  # parameters from the original weights, before any error feedback
        scale, zero_point = int_params(w, bits, group_size, symmetric)
    else:
        scale = torch.empty(n, k // g, dtype=torch.bfloat16)
        zero_point = None if symmetric else torch.empty(n, k // g, dtype=torch.int8)

    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h)

    q_out = torch.empty(n, k, dtype=torch.int8)
    block = max(BLOCK, g) if group_size else BLOCK
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, b0:b1].clone()
        err = torch.empty_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            orig = int(perm[col])
            grp = orig // g
            if not static and col % g == 0:  # lazy groups: parameters from the error-updated weights
                s, z = int_params(wb[:, i : i + g], bits, None, symmetric)
                scale[:, grp], zp = s[:, 0], z
                if zero_point is not None:
                    zero_point[:, grp] = zp[:, 0]
            s = scale[:, grp].float()
            z = zero_point[:, grp].float() if zero_point is not None else 0.0
            q = torch.clamp(torch.round(wb[:, i] / s) + z, qmin, qmax)
            q_out[:, orig] = q.to(torch.int8)
            deq = (q - z) * s
            e = (wb[:, i] - deq) / hb[i, i]
            wb[:, i:] -= e.unsqueeze(1) * hb[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return IntWeight(q_out, scale, zero_point, bits, group_size)
