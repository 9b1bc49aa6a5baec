"""Multi-SLERP: a weighted barycentre of several models on the hypersphere (of task vectors, given a base)."""

from __future__ import annotations

from typing import Any

import torch

from mlc.commands.merge.threads import default_threads
from mlc.contracts import Param, merge_method
from mlc.errors import MlcError


@merge_method(
    "multislerp",
    params=(
        Param("weight", float, per_model=True, help="each model's weight"),
        Param("normalize_weights", bool, True, help="divide the weights by their sum"),
        Param("eps", float, 1e-8, help="guards the divisions by norms"),
    ),
    base="optional",
    min_models=1,
)
def multislerp(models: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any], rng: Any = None) -> torch.Tensor:
    """Project the unit vectors to the tangent space at their weighted mean, average there, map back, rescale by the mean norm."""
    if len(models) == 1:
        return models[0]  # nothing to interpolate (mergekit returns the model itself, base or not)
    eps = params["eps"]
    x = torch.stack(models, dim=0)
    models.clear()
    if base is not None:
        x -= base
    flat = x.view(x.shape[0], -1)
    w = torch.tensor(params["weight"], dtype=x.dtype)
    if params["normalize_weights"]:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    unit = flat / (norms + eps)
    mean = (unit * w.view(-1, 1)).sum(0)
    with default_threads():
        mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if x.shape[0] != 2:
            raise MlcError("multislerp: the weighted sum of the unit task vectors is zero (antipodal inputs with balancing weights)", "use other weights")
        out = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
        return out + base if base is not None else out
    mean = mean / mean_norm
    dots = (unit * mean).sum(-1, keepdim=True)
    tangent = unit - dots * mean
    step = (tangent * w.view(-1, 1)).sum(0)
    with default_threads():
        step_norm = torch.norm(step) + eps
    out = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return out + base if base is not None else out
