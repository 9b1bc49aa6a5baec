"""Drop-Upcycling (2502.19261): each expert re-initialises part of its copy of the dense MLP.

Per expert, a fraction r of the intermediate neurons is chosen; their rows of gate_proj and up_proj
and their columns of down_proj are drawn anew from N(mean, std) of the original matrix. The same
neurons are dropped in all three matrices, so a dropped neuron is a fresh neuron, not a damaged one.
Every random draw comes from a generator keyed by (seed, layer, expert, matrix), so the result is
reproducible and does not depend on the order in which tensors are processed.
"""

from __future__ import annotations

import torch

from mlc.rng import keyed_generator


def dropped_neurons(intermediate: int, ratio: float, seed: int, layer: int, expert: int) -> torch.Tensor:
    """Sorted indices of the round(ratio * intermediate) neurons that this expert re-initialises."""
    count = round(ratio * intermediate)
    order = torch.randperm(intermediate, generator=keyed_generator(seed, "drop-neurons", layer, expert))
    return order[:count].sort().values


def drop_upcycle(weight: torch.Tensor, proj: str, neurons: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """An fp32 copy of a dense MLP weight with `neurons` re-drawn from N(mean, std) of the whole matrix.

    gate and up weights are (intermediate, hidden): a neuron is a row. down is (hidden, intermediate):
    a neuron is a column.
    """
    w = weight.to(torch.float32, copy=True)
    if len(neurons) == 0:
        return w
    axis = 1 if proj == "down" else 0
    mean, std = w.mean().item(), w.std().item()
    shape = list(w.shape)
    shape[axis] = len(neurons)
    fresh = torch.empty(shape, dtype=torch.float32).normal_(mean, std, generator=generator)
    w.index_copy_(axis, neurons, fresh)
    return w
