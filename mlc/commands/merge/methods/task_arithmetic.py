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

from typing import Any

import torch

from mlc.commands.merge import sparsify
from mlc.commands.merge.method import MergeMethod, Param, in_range, merge_method

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
            before = float(d.abs().sum(dtype=torch.float64)) if rescale and mode == "l1" else 0.0
            if how == "magnitude":
                sparsify.magnitude_(d, density, params["tie_order"])
            elif how == "random":
                sparsify.bernoulli_keep_(d, density, rng)
            elif how == "outliers":
                sparsify.magnitude_outliers_(d, density, params["gamma"][i], params["tie_order"])
            else:
                sparsify.della_keep_(d, density, params["epsilon"][i], rng, divide_by_prob=rescale and mode == "inverse_keep")
            if rescale and mode == "l1":
                sparsify.rescale_l1_(d, before)
            elif rescale and how != "della":
                d.div_(density)
        d.mul_(torch.tensor(params["weight"][i], dtype=d.dtype))
        deltas.append(d)
        models[i] = None  # type: ignore[call-overload]
    return deltas


def combine_(deltas: list[torch.Tensor], base: torch.Tensor, params: dict[str, Any], consensus: bool) -> torch.Tensor:
    """base + lambda * (sum of agreeing weighted deltas) / (sum of their weights), written into base.

    Sums accumulate in float32 and round once to the compute dtype, as torch's sum over a stacked
    tensor does, so results match mergekit's bit for bit in float32 and, outside ties in the
    sparsification, in bfloat16. The work goes in cache-sized chunks, overwriting the deltas.
    """
    dtype = base.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weights = torch.tensor(params["weight"], dtype=dtype).tolist()  # rounded to the compute dtype, like mergekit's
    divisor = sum(torch.tensor(weights, dtype=acc).tolist()) if not consensus else None
    if divisor is not None:
        divisor = float(torch.tensor(divisor, dtype=acc).to(dtype)) if abs(divisor) >= 1e-8 else 1.0
    out = base.view(-1)
    flats = [d.view(-1) for d in deltas]
    for start in range(0, out.numel(), CHUNK):
        # Widened once per chunk (exact): the sign, clamp and sums below then run as float32 vector ops,
        # several times faster than bf16 element-wise ops on CPU, with the same results.
        parts = [f[start : start + CHUNK].to(acc) for f in flats]
        mixed = parts[0].clone()
        for p in parts[1:]:
            mixed += p
        if consensus:
            # The elected sign is that of the weighted sum; an entry agrees when p * sign > 0. Summing
            # the agreeing magnitudes and then applying the sign gives exactly the sum of the entries.
            sign = torch.where(mixed >= 0, 1.0, -1.0).to(acc)
            mixed.zero_()
            total = torch.zeros_like(mixed)
            for p, w in zip(parts, weights):
                p.mul_(sign).clamp_min_(0)
                mixed += p
                total.add_(p > 0, alpha=w)
            mixed *= sign
            chunk_divisor = total.to(dtype)
            chunk_divisor.masked_fill_(chunk_divisor == 0, 1)
        else:
            chunk_divisor = divisor
        merged = mixed.to(dtype)
        if params["normalize"]:
            merged /= chunk_divisor
        if params["lambda"] != 1:
            merged *= params["lambda"]
        out[start : start + CHUNK] += merged
    return base


def _family(name: str, how: str | None, consensus: bool, normalize: bool, rescale: bool, doc: str) -> MergeMethod:
    extra: tuple[Param, ...] = ()
    if how in ("magnitude", "outliers"):
        extra = (
            Param(
                "tie_order",
                str,
                "index",
                choices=("index", "argsort"),
                help="equal magnitudes at the threshold: keep lower indices (fast), or torch.argsort's order (mergekit's exact picks, a full sort)",
            ),
        )
    if how == "outliers":
        extra += (Param("gamma", float, 0.01, per_model=True, check=in_range(0, 1, high_open=True), help="fraction of largest entries dropped"),)
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
