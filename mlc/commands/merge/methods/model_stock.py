"""Model Stock (2403.19522): move from the base toward the models' mean by a ratio set by their angle."""

from __future__ import annotations

from typing import Any

import torch

from mlc.contracts import Param, merge_method


@merge_method(
    "model_stock",
    params=(Param("filter_wise", bool, False, help="one ratio per output row instead of per tensor"),),
    base="required",
    min_models=2,
)
def model_stock(models: list[torch.Tensor], base: torch.Tensor, params: dict[str, Any], rng: Any = None) -> torch.Tensor:
    """t·mean(x_i) + (1-t)·base with t = N cos / (1 + (N-1) cos), cos the mean pairwise cosine of the x_i - base."""
    shape = base.shape
    if params["filter_wise"]:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [x.unsqueeze(0) if x.dim() == 1 else x for x in models]
    else:
        w0, ws = base.reshape(-1), [x.reshape(-1) for x in models]
    # Offsets are recomputed per pair rather than all kept: memory stays at three tensors beyond the inputs.
    cosines = []
    for i in range(len(ws)):
        off_a = ws[i] - w0
        for j in range(i + 1, len(ws)):
            off_b = ws[j] - w0
            norms = torch.norm(off_a, dim=-1) * torch.norm(off_b, dim=-1)
            cosines.append(((off_a * off_b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
            del off_b
        del off_a
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    # Where the models cancel out (denominator ~ 0) there is no finite ratio: keep the base there.
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denominator), denominator))
    mean = sum(ws) / n
    return (t * mean + (1 - t) * w0).reshape(shape)
