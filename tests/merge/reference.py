"""Reference merges in float64, written from the papers' formulas and independent of mlc's code."""

from __future__ import annotations

import math

import torch


def topk_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The int(density*n) largest |delta| (at least one); equal magnitudes: lower index first."""
    flat = delta.reshape(-1).tolist()
    k = max(1, int(density * len(flat)))
    keep = sorted(range(len(flat)), key=lambda i: (-abs(flat[i]), i))[:k]
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[keep] = True
    return mask.view(delta.shape)


def band_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop int(gamma*n) largest then the smallest, keeping int(density*n)."""
    flat = delta.reshape(-1).tolist()
    n = len(flat)
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    order = sorted(range(n), key=lambda i: (abs(flat[i]), i))[bottom : bottom + target]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order] = True
    return mask.view(delta.shape)


def linear(xs: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    return sum(wi * x for wi, x in zip(w, xs)) / sum(w)


def task_arithmetic(base: torch.Tensor, xs: list[torch.Tensor], w: list[float], lam: float = 1.0) -> torch.Tensor:
    return base + lam * sum(wi * (x - base) for wi, x in zip(w, xs))


def ties(base: torch.Tensor, xs: list[torch.Tensor], w: list[float], density: list[float], masks=None) -> torch.Tensor:
    deltas = []
    for i, (x, wi, d) in enumerate(zip(xs, w, density)):
        delta = x - base
        mask = topk_mask(delta, d) if masks is None else masks[i](delta)
        deltas.append(wi * delta * mask)
    stacked = torch.stack(deltas)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(base.dtype)
    agree = (torch.sign(stacked) == sign).to(base.dtype)
    weights = torch.tensor(w, dtype=base.dtype).view(-1, *[1] * base.dim())
    num = (stacked * agree).sum(0)
    den = (weights * agree).sum(0)
    den[den == 0] = 1
    return base + num / den


def breadcrumbs(base: torch.Tensor, xs: list[torch.Tensor], w: list[float], density: float, gamma: float) -> torch.Tensor:
    return base + sum(wi * (x - base) * band_mask(x - base, density, gamma) for wi, x in zip(w, xs))


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    a, b = v0.reshape(-1), v1.reshape(-1)
    cos = float((a / a.norm()).dot(b / b.norm()))
    if abs(cos) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def model_stock(base: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
    offs = [(x - base).reshape(-1) for x in xs]
    cos = [float(a.dot(b) / (a.norm() * b.norm())) for i, a in enumerate(offs) for b in offs[i + 1 :]]
    c = sum(cos) / len(cos)
    n = len(xs)
    t = n * c / (1 + (n - 1) * c)
    return t * sum(xs) / n + (1 - t) * base
