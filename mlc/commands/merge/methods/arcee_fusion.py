"""Arcee Fusion: take the other model's value only where it changed most, by |delta| times the rows' KL divergence."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mlc.commands.merge.threads import default_threads
from mlc.contracts import merge_method

SAMPLE = 1_000_000  # quantiles of larger tensors come from this many entries drawn with replacement


@merge_method("arcee_fusion", base="required", min_models=1, max_models=1, random=True, promotes_to_float32=True)
def arcee_fusion(models: list[torch.Tensor], base: torch.Tensor, params: dict[str, Any], rng: torch.Generator | None = None) -> torch.Tensor:
    """base + (x - base) where importance >= median + 1.5 IQR of the importances, else base (float32 for 16-bit inputs, as mergekit).

    Tensors above a million entries estimate the quantiles from a seeded sample (mergekit samples from
    torch's global generator), so only they are random.
    """
    x = models[0]
    score = importance(x, base)
    mask = (score >= threshold(score, rng)).float()
    return base + (x - base) * mask


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - base| times the KL divergence between the softmaxes of each row of x and of the base."""
    diff = (x - base).abs()
    p = F.softmax(x, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    with default_threads():  # a 1-D tensor is one row: a reduction to one number
        kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return diff * kl


def threshold(score: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    """median + 1.5 * (q3 - q1) of the scores, quantiles read off the sorted scores (or a sample of them)."""
    flat = score.reshape(-1)
    if flat.numel() > SAMPLE:
        flat = flat[torch.randint(flat.numel(), (SAMPLE,), generator=rng)]
    ordered = torch.sort(flat).values
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    return median + 1.5 * (q3 - q1)
