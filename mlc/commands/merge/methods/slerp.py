"""SLERP: spherical interpolation between the base and one other model, per tensor."""

from __future__ import annotations

from typing import Any

import torch

from mlc.contracts import Param, in_range, merge_method

CHUNK = 1 << 20  # float32 scratch per pass; the same chunking as mergekit, so float32 results agree exactly


@merge_method(
    "slerp",
    params=(Param("t", float, check=in_range(0, 1), help="0 gives the base, 1 the other model"),),
    base="required",
    min_models=1,
    max_models=1,
)
def slerp(models: list[torch.Tensor], base: torch.Tensor, params: dict[str, Any], rng: Any = None) -> torch.Tensor:
    """sin((1-t)θ)/sin θ · base + sin(tθ)/sin θ · other, θ the angle between them; linear when nearly parallel."""
    return slerp_tensors(params["t"], base, models[0])


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two same-shape tensors as flat vectors, in float32 (float64 for float64)."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(-1), v1.reshape(-1)
    chunks = range(0, a.numel(), CHUNK)
    if not a.numel():
        return v0.to(dtype)
    # Norms of chunk norms, as mergekit computes them.
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[s : s + CHUNK].to(dtype)) for s in chunks]))
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[s : s + CHUNK].to(dtype)) for s in chunks]))
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dots = [((a[s : s + CHUNK].to(dtype) / norm_a) * (b[s : s + CHUNK].to(dtype) / norm_b)).sum() for s in chunks]
    dot = torch.stack(dots).sum().clamp(-1, 1)
    tt = torch.tensor(t, dtype=dtype)
    if dot.abs() > dot_threshold:
        coef_a, coef_b = 1 - tt, tt
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a, coef_b = torch.sin((1 - tt) * theta) / sin_theta, torch.sin(tt * theta) / sin_theta
    out = torch.empty(a.shape, dtype=dtype)
    for s in chunks:
        out[s : s + CHUNK] = coef_a * a[s : s + CHUNK].to(dtype) + coef_b * b[s : s + CHUNK].to(dtype)
    return out.view(v0.shape)
