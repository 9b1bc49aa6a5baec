"""--shared-merge: attention, norms, embeddings (and the shared expert) from a merge of the expert sources.

The method is any `mlc.merge_methods.v1` plugin (mlc.contracts.MergeMethod):
methods that take a base (task arithmetic, TIES, SLERP, ...) get the dense base as `base` and the
sources as `models`; methods that treat a base as one more input (linear) merge the sources alone.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from mlc.contracts import MergeMethod
from mlc.rng import keyed_generator


def parse_merge_params(items: list[str]) -> tuple[dict[str, Any], list[str]]:
    """KEY=VALUE strings into a dict (numbers, booleans or text; comma lists per model); and problems."""
    import yaml

    params: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--merge-param {item!r} is not KEY=VALUE")
            continue
        parsed = yaml.safe_load(f"[{value}]") if "," in value else yaml.safe_load(value)
        params[key.strip()] = parsed
    return params, problems


def merge_problems(method: MergeMethod, params: Mapping[str, Any], sources: int) -> list[str]:
    """Why this method cannot merge `sources` models with these parameters (empty when it can)."""
    has_base = method.base == "required"  # the dense base is passed as `base` to methods that take one
    problems = []
    if (why := method.count_problem(sources, has_base)) is not None:
        problems.append(f"--shared-merge: {why}")
    try:
        method.bind(params, sources)
    except ValueError as e:
        problems.append(f"--shared-merge {method.name}: {e}")
    return problems


def merge_shared_tensor(
    method: MergeMethod, params: Mapping[str, Any], seed: int, name: str, base: torch.Tensor | None, sources: list[torch.Tensor]
) -> torch.Tensor:
    """One shared tensor merged from the sources; `base` is passed to methods that take one (else None)."""
    rng = keyed_generator(seed, "shared-merge", name) if method.random else None
    return method(sources, base=base, params=params, rng=rng, consume=True)
