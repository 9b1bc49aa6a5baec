"""Sparsification of task vectors (deltas): magnitude top-k (TIES), breadcrumbs, random drop (DARE), DELLA.

The magnitude selections keep exactly the entries mergekit keeps. mergekit ranks |delta| (cast to
float32) with torch's CPU sort, which is not stable: among equal magnitudes at the threshold (common
between bf16 weights) the picks follow std::sort's partitions. `sorted_range_keep` gets those same
picks from sortselect.c, which replays only the partitions that decide them (a few times faster than
the full sort), or from torch's sort itself where that kernel is not available. Every function here
works in place on the delta it is given.
"""

from __future__ import annotations

import threading

import torch

from mlc.commands.merge import native

CHUNK = 1 << 22  # elements per pass of the random drop
_KIND = {torch.float32: 0, torch.bfloat16: 1}  # delta dtypes the kernel reads directly (others: |delta| given)
_scratch = threading.local()  # per worker thread: page-faulting fresh buffers for every tensor cost a tenth of a merge


def _buffers(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    w, ix = getattr(_scratch, "w", None), getattr(_scratch, "ix", None)
    if w is None or w.numel() < n:
        _scratch.w = _scratch.ix = None
        w, ix = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.int32)
        _scratch.w, _scratch.ix = w, ix
    return w[:n], ix[:n]


def sorted_range_keep(delta: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    """A flat uint8 mask of the entries that torch.sort(|delta| as float32, descending) puts at start..stop-1.

    The mask is scratch memory of this thread: use it before the next call.
    """
    flat = delta.reshape(-1)
    n = flat.numel()
    lib = native.library()
    if lib is not None and n < 2**31 and flat.is_contiguous():
        w, ix = _buffers(n)
        kind = _KIND.get(flat.dtype, 2)
        if kind == 2:
            w.copy_(flat.abs())
        keep = w.view(torch.uint8)[:n]  # written after w is read
        if lib.mlc_sort_select(flat.data_ptr(), kind, w.data_ptr(), ix.data_ptr(), n, start, stop, int(descending), keep.data_ptr()) == 0:
            return keep
    # A NaN, introsort's depth limit or no compiler: sort with torch, as mergekit does.
    order = torch.sort(flat.abs().float(), descending=descending).indices[start:stop]
    keep = torch.zeros(n, dtype=torch.uint8)
    keep[order] = 1
    return keep


def keep_only_(delta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the entries of delta where the flat uint8 mask keep is 0, in place (+0.0, as masked_fill gives)."""
    lib = native.library()
    if lib is not None and delta.is_contiguous() and delta.element_size() in (2, 4):
        lib.mlc_apply_keep(delta.data_ptr(), delta.element_size(), keep.data_ptr(), delta.numel())
        return delta
    return delta.masked_fill_(keep.view(delta.shape) == 0, 0)


def magnitude_(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density * n) largest-magnitude entries (at least one), in place: mergekit's `magnitude`."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return delta.zero_()
    k = max(1, int(density * delta.numel()))
    return keep_only_(delta, sorted_range_keep(delta, 0, k, descending=True))


def magnitude_outliers_(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the gamma fraction of largest magnitudes, then the smallest, keeping int(density*n)."""
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)  # fewer outliers are dropped when density asks for more
    return keep_only_(delta, sorted_range_keep(delta, n_bottom, n_bottom + target, descending=False))


def bernoulli_keep_(delta: torch.Tensor, density: float, rng: torch.Generator) -> torch.Tensor:
    """DARE's drop: keep each entry with probability density, in place (no rescaling here)."""
    if density >= 1:
        return delta
    flat = delta.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start : start + CHUNK]
        part.masked_fill_(torch.rand(part.shape, generator=rng) >= density, 0)
    return delta


def della_keep_(
    delta: torch.Tensor, density: float, epsilon: float, rng: torch.Generator, divide_by_prob: bool = False
) -> torch.Tensor:
    """DELLA's MagPrune: keep each entry with a probability rising linearly with its magnitude rank in its row.

    Probabilities run from density - epsilon (smallest |delta| of the row) to density + epsilon (largest),
    so the expected density stays `density`. 1-D tensors are one row. divide_by_prob rescales each
    kept entry by 1/p, the paper's rescaling.
    """
    if density >= 1:
        return delta
    rows = delta.view(1, -1) if delta.dim() < 2 else delta.view(delta.shape[0], -1)
    n = rows.shape[1]
    order = rows.abs().argsort(dim=1)
    ranks = torch.empty(rows.shape, dtype=torch.float32)
    ranks.scatter_(1, order, torch.arange(n, dtype=torch.float32).expand_as(ranks).contiguous())
    del order
    # mergekit normalises ranks 1..n to [0, 1] by (r - 1) / (n - 1).
    probs = ranks.div_(max(n - 1, 1)).mul_(2 * epsilon).add_(density - epsilon)
    keep = torch.rand(rows.shape, generator=rng) < probs
    rows.masked_fill_(~keep, 0)
    if divide_by_prob:
        rows.div_(probs)
    return delta


def l1_norm(delta: torch.Tensor) -> torch.Tensor:
    """sum |delta| as mergekit's rescaling computes it: a 0-d tensor in delta's dtype, summed as a default torch process sums."""
    from mlc.commands.merge.threads import default_threads

    with default_threads():
        return delta.abs().sum()


def rescale_l1_(delta: torch.Tensor, before: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale a sparsified delta back to the L1 norm it had before (mergekit's `rescale`), in its dtype."""
    after = l1_norm(delta)
    if bool(before < eps) or bool(after < eps):
        return delta
    return delta.mul_(before / after)
