"""Karcher mean: the Riemannian centre of the models' directions on the unit sphere, scaled by their mean norm."""

from __future__ import annotations

from typing import Any

import torch

from mlc.commands.merge.threads import default_threads
from mlc.contracts import Param, in_range, merge_method


@merge_method(
    "karcher",
    params=(
        Param("max_iter", int, 10, check=in_range(0, 10_000), help="fixed-point iterations"),
        Param("tol", float, 1e-5, check=in_range(0, 1), help="stop once the tangent step is this small"),
    ),
    base="input",
    min_models=1,
)
def karcher(models: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any], rng: Any = None) -> torch.Tensor:
    """The equal-weight Karcher mean of the inputs' unit vectors (a base model is one more input), times their mean norm."""
    if len(models) == 1:
        return models[0]
    with default_threads():  # norms and dot products of whole tensors
        return karcher_mean(models, [1.0 / len(models)] * len(models), params["max_iter"], params["tol"])


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """Iterate mean <- exp_mean(sum_i a_i log_mean(u_i)) from the normalised weighted mean; mergekit's operations and order."""
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(t.to(acc)) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(t * 0 for t in tensors)  # type: ignore[return-value]
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    points = [units[i] for i in valid]
    mean = torch.zeros_like(points[0])
    for a, u in zip(weights, points):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(acc))
    mean = points[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, points):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        step = torch.linalg.vector_norm(tangent.to(acc))
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        norm = torch.linalg.vector_norm(mean.to(acc))
        if norm.item() > tol:
            mean = (mean / norm).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return scale * mean
