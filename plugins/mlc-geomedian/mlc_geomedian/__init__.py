"""Geometric-median merge: the point that minimises the summed distance to the models, robust to outliers.

The weighted mean (a linear merge, a model soup) moves by a fixed share of any one input, however far
off that input is; the geometric median moves by a bounded amount, so a fine-tune that diverged or a
model with a broken tensor cannot drag the merge away (its breakdown point is one half: fewer than
half the weight in bad inputs leaves the median near the good ones). Pillutla, Kakade and Harchaoui,
"Robust Aggregation for Federated Learning" (1912.13445), use it to average model updates for that
reason. Each tensor is one point in R^numel and gets its own median.

Computed with Weiszfeld's algorithm, the standard fixed-point iteration
    y <- sum_i (w_i / |x_i - y|) x_i / sum_i (w_i / |x_i - y|),
started from the weighted mean and run until a step moves y by less than `tolerance` relative to |y|.
"""

from __future__ import annotations

from typing import Any

import torch

from mlc.contracts import Param, in_range, merge_method

__version__ = "0.1.0"


@merge_method(
    "geometric_median",
    params=(
        Param("weight", float, 1.0, per_model=True, help="each input's weight (a weight of 2 counts the input twice)",
              check=lambda w: None if w > 0 else f"must be positive, got {w:g}"),
        Param("iterations", int, 100, help="most Weiszfeld steps per tensor", check=in_range(1, 10_000)),
        Param("tolerance", float, 1e-6, help="stop when a step moves the median by less than this, relative to its norm",
              check=in_range(0, 1, low_open=True)),
    ),
    base="input",  # a configured base_model is one more point, as for linear
    min_models=1,
)
def geometric_median(models: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any],
                     rng: Any = None) -> torch.Tensor:
    """argmin_y sum_i w_i |x_i - y| by Weiszfeld's iteration, in float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if models[0].dtype == torch.float64 else torch.float32
    points = [x.to(dtype) for x in models]
    weights = torch.tensor(params["weight"], dtype=torch.float64)
    y = _weighted_sum(points, weights / weights.sum(), dtype)
    scale = max(float(torch.linalg.vector_norm(x)) for x in points)
    # Where y lands on an input its distance is 0; flooring distances keeps the step finite and
    # pins y there, which is right when that input is the median (it carries half the weight or more).
    floor = max(scale, 1e-30) * 1e-12
    for _ in range(params["iterations"]):
        distances = torch.tensor([float(torch.linalg.vector_norm(x - y)) for x in points], dtype=torch.float64)
        coef = weights / distances.clamp_min(floor)
        step = _weighted_sum(points, coef / coef.sum(), dtype)
        moved = float(torch.linalg.vector_norm(step - y))
        y = step
        if moved <= params["tolerance"] * max(float(torch.linalg.vector_norm(y)), floor):
            break
    return y


def _weighted_sum(points: list[torch.Tensor], coef: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(points[0].shape, dtype=dtype)
    for c, x in zip(coef.tolist(), points):
        out.add_(x, alpha=c)
    return out
