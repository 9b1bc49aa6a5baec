"""When each request is sent: gamma-distributed gaps (1 = Poisson), optionally ramping the rate up.

The process is vLLM's (`get_request` in vllm/benchmarks/serve.py): gap i ~ Gamma(shape=b, scale=1/(r_i*b))
for burstiness b and rate r_i, so gaps have mean 1/r_i and coefficient of variation 1/sqrt(b); b = inf
gives constant gaps. Without ramp-up the cumulative times are rescaled so the last request goes out at
exactly N/rate (vLLM does this to keep the realised rate from drifting 1-2% between seeds). With ramp-up
the rate goes from start to end linearly or geometrically over the requests and nothing is rescaled.
A request rate of inf sends every request at time 0.

Differences from vLLM: the draws come from numpy's Generator seeded with --seed (vLLM reseeds numpy's
legacy global generator), so a seed gives the same distribution but not the same times as vLLM.
"""

from __future__ import annotations

import math

import numpy as np


def ramp_rates(n: int, strategy: str, start: float, end: float) -> np.ndarray:
    """The request rate at which each of n requests is scheduled during a linear or exponential ramp."""
    progress = np.arange(n) / max(n - 1, 1)
    if strategy == "linear":
        return start + (end - start) * progress
    if strategy == "exponential":
        return start * (end / start) ** progress
    raise ValueError(f"unknown ramp-up strategy {strategy!r}")


def arrival_times(
    n: int,
    rate: float,
    burstiness: float = 1.0,
    seed: int = 0,
    ramp_up: str | None = None,
    ramp_start: float | None = None,
    ramp_end: float | None = None,
) -> np.ndarray:
    """Seconds after the start at which each of n requests is sent."""
    rates = ramp_rates(n, ramp_up, ramp_start, ramp_end) if ramp_up else np.full(n, rate, dtype=float)
    if np.isinf(rates).all():
        return np.zeros(n)
    if math.isinf(burstiness):
        gaps = 1.0 / rates
    else:
        rng = np.random.default_rng(seed)
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rates * burstiness))
    times = np.cumsum(gaps)
    if not ramp_up and times[-1] > 0:
        times *= (n / rate) / times[-1]
    return times
