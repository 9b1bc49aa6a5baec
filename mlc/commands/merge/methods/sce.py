"""SCE (2408.07990): select the most varying entries, calculate per-model weights from energy, erase minority signs."""

from __future__ import annotations

from typing import Any

import torch

from mlc.contracts import Param, in_range, merge_method


@merge_method(
    "sce",
    params=(
        Param("select_topk", float, 1.0, check=in_range(0, 1), help="fraction of entries kept, those whose task vectors vary most across models"),
        Param("int8_mask", bool, False, help="mergekit's memory option for its masks; results are the same either way"),
    ),
    base="required",
)
def sce(models: list[torch.Tensor], base: torch.Tensor, params: dict[str, Any], rng: Any = None) -> torch.Tensor:
    """base + sum_i w_i m_i d_i / sum_i w_i m_i, w_i the share of mean squared task vector, m_i the sign agreement."""
    if not models:
        return base
    tv = torch.stack([x - base for x in models], dim=0)
    models.clear()
    if params["select_topk"] < 1:
        tv = tv * top_variance(tv, params["select_topk"]).to(base.dtype).unsqueeze(0)
    agree = sign_agreement(tv)
    weights = energy_shares(tv)
    while weights.dim() < tv.dim():
        weights = weights.unsqueeze(-1)
    erased = weights * agree
    merged = (tv * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


def top_variance(tv: torch.Tensor, fraction: float) -> torch.Tensor:
    """A 0/1 int8 mask of the int(fraction * nonzero) entries with the largest variance across models."""
    if fraction <= 0:
        return torch.zeros(tv.shape[1:], dtype=torch.int8)
    var = torch.var(tv, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)  # the float32 product truncated, as mergekit computes it
    mask = torch.zeros(var.shape, dtype=torch.int8)
    if k:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def sign_agreement(tv: torch.Tensor) -> torch.Tensor:
    """True where a task-vector entry has the sign of the entries' sum (TIES' election by mass)."""
    elected = (tv.sum(dim=0) >= 0).to(tv.dtype) * 2 - 1
    return tv.sign() == elected


def energy_shares(tv: torch.Tensor) -> torch.Tensor:
    """Each model's mean squared task vector over their sum (equal shares when all are ~0)."""
    energy = tv.square().reshape(tv.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total
