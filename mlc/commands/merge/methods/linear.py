"""Linear merge (model soups, 2203.05482): the weighted average of the inputs."""

from __future__ import annotations

from typing import Any

import torch

from mlc.contracts import Param, merge_method


@merge_method(
    "linear",
    params=(
        Param("weight", float, per_model=True, help="each input's weight"),
        Param("normalize", bool, True, help="divide by the sum of the weights"),
    ),
    base="input",
    min_models=1,
)
def linear(models: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any], rng: Any = None) -> torch.Tensor:
    """Weighted average sum(w_i * x_i) / sum(w_i), accumulated in float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if models[0].dtype == torch.float64 else torch.float32
    weights = torch.tensor(params["weight"], dtype=dtype)
    out = torch.zeros(models[0].shape, dtype=dtype)
    for i, x in enumerate(models):
        out.addcmul_(x, weights[i])  # the same fused op as mergekit, so float32 results agree bit for bit
        models[i] = None  # type: ignore[call-overload]  # free each input as soon as it is added
    if params["normalize"]:
        out.div_(weights.sum())
    return out
