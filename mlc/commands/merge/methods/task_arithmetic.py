"""The task-arithmetic family: task_arithmetic, TIES, DARE, Model Breadcrumbs and DELLA.

Every member computes task vectors d_i = x_i - base, optionally sparsifies each one, weights it,
optionally keeps only the entries that agree with an elected sign (TIES), sums them, optionally
divides by the weights that contributed, scales by lambda and adds the result to the base:

    out = base + lambda * sum_i(w_i * m_i * d_i) / sum_i(w_i * m_i)      (m_i: sparsity and sign masks)

Defaults follow mergekit 0.1.5 so its YAMLs give the same model. `rescale` restores a sparsified
vector's L1 norm (mergekit's DARE and DELLA); `rescale_mode: inverse_keep` divides each kept entry
by its keep probability instead, which is the DARE and DELLA papers' 1/(1-p) rescaling.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from mlc.commands.merge import native, sparsify
from mlc.contracts import MergeMethod, Param, in_range, merge_method

CHUNK = 1 << 16  # elements per pass of the combine step: temporaries stay in cache (and off mmap)


def _params(default_normalize: bool, default_rescale: bool, extra: tuple[Param, ...] = ()) -> tuple[Param, ...]:
    return (
        Param("weight", float, per_model=True, help="how much of each model's task vector to add"),
        Param("density", float, 1.0, per_model=True, check=in_range(0, 1, low_open=True), help="fraction of each task vector kept"),
        Param("lambda", float, 1.0, help="scale of the merged task vector"),
        Param("normalize", bool, default_normalize, help="divide by the sum of the contributing weights"),
        Param("rescale", bool, default_rescale, help="rescale sparsified task vectors (see rescale_mode)"),
        Param(
            "rescale_mode",
            str,
            "l1",
            choices=("l1", "inverse_keep"),
            help="l1: restore each vector's L1 norm (mergekit); inverse_keep: divide by the keep probability (DARE/DELLA papers)",
        ),
        Param("int8_mask", bool, False, help="mergekit's memory option; mlc's masks are always 1-byte, so it changes nothing"),
    ) + extra


def task_vectors(
    models: list[torch.Tensor], base: torch.Tensor, params: dict[str, Any], rng: torch.Generator | None, how: str | None
) -> list[torch.Tensor]:
    """Each input turned, in place, into its weighted and sparsified task vector w_i * sparsify(x_i - base)."""
    deltas = []
    for i, x in enumerate(models):
        d = x.sub_(base)
        density = params["density"][i]
        if how is not None and density < 1:
            rescale, mode = params["rescale"], params["rescale_mode"]
            before = sparsify.l1_norm(d) if rescale and mode == "l1" else None
            if how == "magnitude":
                sparsify.magnitude_(d, density)
            elif how == "random":
                sparsify.bernoulli_keep_(d, density, rng)
            elif how == "outliers":
                sparsify.magnitude_outliers_(d, density, params["gamma"][i])
            else:
                sparsify.della_keep_(d, density, params["epsilon"][i], rng, divide_by_prob=rescale and mode == "inverse_keep")
            if before is not None:
                sparsify.rescale_l1_(d, before)
            elif rescale and how != "della":
                d.div_(density)
        d.mul_(torch.tensor(params["weight"][i], dtype=d.dtype))
        deltas.append(d)
        models[i] = None  # type: ignore[call-overload]
    return deltas


def combine_(deltas: list[torch.Tensor], base: torch.Tensor, params: dict[str, Any], consensus: bool) -> torch.Tensor:
    """base + lambda * (sum of agreeing weighted deltas) / (sum of their weights), written into base.

    Every intermediate is rounded where mergekit's tensor operations round it (sums over the models
    accumulate in float32 and round once to the compute dtype), so results match its bit for bit.
    bfloat16 and float32 run in one pass of sortselect.c's combine; other dtypes (and the rest of a
    tensor after a NaN) in cache-sized chunks of torch operations, overwriting the deltas.
    """
    dtype = base.dtype
    weights_t = torch.tensor(params["weight"], dtype=dtype)  # rounded to the compute dtype, like mergekit's
    weights = weights_t.tolist()
    divisor = 1.0
    if not consensus:
        total = float(weights_t.view(-1, 1).sum(dim=0))
        divisor = total if abs(total) >= 1e-8 else 1.0
    out = base.view(-1)
    flats = [d.view(-1) for d in deltas]
    done = 0
    lib = native.library()
    if lib is not None and dtype in _NATIVE and len(flats) <= 64 and out.is_contiguous() and all(f.is_contiguous() for f in flats):
        pointers = (ctypes.c_void_p * len(flats))(*[f.data_ptr() for f in flats])
        rounded = (ctypes.c_float * len(weights))(*weights)
        lam = params["lambda"]
        done = lib.mlc_combine(
            _NATIVE[dtype], pointers, len(flats), rounded, out.data_ptr(), out.data_ptr(), out.numel(),
            int(consensus), int(params["normalize"]), divisor, int(lam != 1), lam,
        )
    for start in range(done, out.numel(), CHUNK):
        _combine_chunk(out[start : start + CHUNK], [f[start : start + CHUNK] for f in flats], weights, divisor, params, consensus)
    return base


_NATIVE = {torch.float32: 0, torch.bfloat16: 1}


def _combine_chunk(out: torch.Tensor, parts: list[torch.Tensor], weights: list[float], divisor: float, params: dict[str, Any], consensus: bool) -> None:
    """combine_ on one chunk with torch operations (out += the merged chunk)."""
    dtype = out.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # Widened once (exact): the sums below run as float32 vector ops, from +0 in model order as torch's sum does.
    parts = [p.to(acc) for p in parts]
    mixed = torch.zeros_like(parts[0])
    for p in parts:
        mixed += p
    if consensus:
        # The elected sign is that of the weighted sum rounded to the compute dtype; an entry agrees when
        # p * sign > 0. Summing the agreeing magnitudes and then applying the sign gives their exact sum.
        sign = torch.where(mixed.to(dtype) >= 0, 1.0, -1.0).to(acc)
        mixed.zero_()
        total = torch.zeros_like(mixed)
        for p, w in zip(parts, weights):
            p.mul_(sign).clamp_min_(0)
            mixed += p
            total.add_(p > 0, alpha=w)
        mixed = mixed * sign + 0.0  # + 0: an element with no agreeing entry sums to +0, as a sum from +0 does
        chunk_divisor: Any = total.to(dtype)
        chunk_divisor.masked_fill_(chunk_divisor == 0, 1)
    else:
        chunk_divisor = divisor
    merged = mixed.to(dtype)
    if params["normalize"]:
        merged /= chunk_divisor
    if params["lambda"] != 1:
        merged *= params["lambda"]
    out += merged


def _family(name: str, how: str | None, consensus: bool, normalize: bool, rescale: bool, doc: str) -> MergeMethod:
    extra: tuple[Param, ...] = ()
    if how == "outliers":
        extra = (Param("gamma", float, 0.01, per_model=True, check=in_range(0, 1, high_open=True), help="fraction of largest entries dropped"),)
    if how == "della":
        extra = (Param("epsilon", float, 0.15, per_model=True, check=in_range(0, 1, high_open=True), help="spread of keep probabilities around density"),)

    def merge(models: list[torch.Tensor], base: torch.Tensor, params: dict[str, Any], rng: torch.Generator | None = None) -> torch.Tensor:
        if not models:
            return base
        deltas = task_vectors(models, base, params, rng, how)
        return combine_(deltas, base, params, consensus)

    merge.__doc__ = doc
    return merge_method(
        name,
        params=_params(normalize, rescale, extra),
        base="required",
        random=how in ("random", "della"),
        check=_della_check if how == "della" else None,
    )(merge)


def _della_check(params: dict[str, Any]) -> str | None:
    for density, epsilon in zip(params["density"], params["epsilon"]):
        if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
            return f"della needs density - epsilon and density + epsilon inside (0, 1), got density {density:g}, epsilon {epsilon:g}"
    return None


task_arithmetic = _family("task_arithmetic", None, False, False, False, "Task arithmetic (2212.04089): base + lambda * sum_i w_i (x_i - base).")
ties = _family("ties", "magnitude", True, True, False, "TIES (2306.01708): trim each task vector to its top-density magnitudes, elect signs, average the agreeing entries.")
dare_linear = _family("dare_linear", "random", False, False, True, "DARE (2311.03099): randomly drop task-vector entries, rescale, add linearly.")
dare_ties = _family("dare_ties", "random", True, False, True, "DARE with TIES sign election.")
breadcrumbs = _family("breadcrumbs", "outliers", False, False, False, "Model Breadcrumbs (2312.06795): drop the largest (gamma) and smallest task-vector entries.")
breadcrumbs_ties = _family("breadcrumbs_ties", "outliers", True, False, False, "Model Breadcrumbs with TIES sign election.")
della = _family("della", "della", True, True, True, "DELLA (2406.11617): drop entries with probability falling with magnitude rank, elect signs.")
della_linear = _family("della_linear", "della", False, False, True, "DELLA without sign election.")
