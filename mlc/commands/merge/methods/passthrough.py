"""Passthrough: copy the one input (optionally scaled); with `slices`, this is layer stacking."""

from __future__ import annotations

from typing import Any

import torch

from mlc.contracts import Param, merge_method


@merge_method(
    "passthrough",
    params=(Param("scale", float, None, per_model=True, help="multiply the tensor by this"),),
    base="input",
    min_models=1,
    max_models=1,
)
def passthrough(models: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any], rng: Any = None) -> torch.Tensor:
    """The single input, times `scale` when one is given."""
    scale = params["scale"][0]
    return models[0] if scale is None else models[0].mul_(scale)
