"""NuSLERP: spherical interpolation of two models (or of their task vectors), flattened or row by row."""

from __future__ import annotations

from typing import Any

import torch

from mlc.commands.merge.threads import default_threads
from mlc.contracts import Param, merge_method


@merge_method(
    "nuslerp",
    params=(
        Param("weight", float, per_model=True, help="each model's weight; t = w2 / (w1 + w2)"),
        Param("nuslerp_row_wise", bool, False, help="interpolate each column vector (dimension 0) separately"),
        Param("nuslerp_flatten", bool, True, help="interpolate the whole tensor as one vector"),
    ),
    base="optional",
    min_models=2,
    max_models=2,
)
def nuslerp(models: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any], rng: Any = None) -> torch.Tensor:
    """SLERP between the two models at t = w2 / (w1 + w2); with a base, between their task vectors, added to the base."""
    w1, w2 = params["weight"]
    total = w1 + w2
    t = 0.5 if abs(total) < 1e-6 else w2 / total
    dim = 0 if params["nuslerp_row_wise"] else -1
    if base is None:
        return spherical(t, models[0], models[1], dim, params["nuslerp_flatten"])
    return base + spherical(t, models[0] - base, models[1] - base, dim, params["nuslerp_flatten"])


def spherical(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int, flatten: bool, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation along the last dimension (or dim, or of the flattened tensors), in the inputs' dtype.

    The operations and their order are mergekit's, so results agree bit for bit; vectors within eps of
    parallel interpolate linearly.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    with default_threads():  # a flattened tensor reduces to one number
        u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
        u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
        cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    parallel = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(parallel, 0, cos))
    sin_theta = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    out = torch.where(parallel, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)
