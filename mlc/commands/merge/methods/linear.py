"""Linear merge (model soups, 2203.05482): the weighted average of the inputs."""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from mlc.commands.merge import native
from mlc.contracts import Param, merge_method

_NATIVE = {torch.float32: 0, torch.bfloat16: 1}
SPLIT = 1 << 20  # elements: the smallest share of a tensor worth a thread of its own


@merge_method(
    "linear",
    params=(
        Param("weight", float, per_model=True, help="each input's weight"),
        Param("normalize", bool, True, help="divide by the sum of the weights"),
    ),
    base="input",
    min_models=1,
)
def linear(models: list[torch.Tensor], base: torch.Tensor | None, params: dict[str, Any], rng: Any = None) -> torch.Tensor:
    """Weighted average sum(w_i * x_i) / sum(w_i) in the inputs' dtype, accumulated in float32 (float64 for float64).

    As mergekit: a float32 accumulator from zero, one addcmul_ per model, one div_, then the cast back.
    bfloat16 and float32 inputs take sortselect.c's one-pass kernel, which rounds at the same steps (the
    same bits) without the float32 temporaries; torch's threads of this thread split the tensor.
    """
    dtype = models[0].dtype
    weights = torch.tensor(params["weight"], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    divisor = weights.sum()
    kind = _NATIVE.get(dtype)
    lib = native.library()
    if lib is None or kind is None or any(x.dtype != dtype or not x.is_contiguous() for x in models):
        return _torch_linear(models, weights, divisor, params["normalize"]).to(dtype)
    out = torch.empty_like(models[0])
    flats, flat_out = [x.view(-1) for x in models], out.view(-1)
    pointers = (ctypes.c_void_p * len(flats))(*[f.data_ptr() for f in flats])
    w = (ctypes.c_float * len(flats))(*weights.tolist())
    n = flat_out.numel()
    parts = max(1, min(torch.get_num_threads(), n // SPLIT))
    bounds = [n * k // parts // 1024 * 1024 for k in range(parts)] + [n]  # chunk-aligned: no two threads share a cache line

    def run(k: int) -> None:
        start, stop = bounds[k], bounds[k + 1]
        at = (ctypes.c_void_p * len(flats))(*[p + start * flats[0].element_size() for p in pointers])
        done = start + lib.mlc_linear(kind, at, len(flats), w, flat_out.data_ptr() + start * out.element_size(), stop - start, int(params["normalize"]), float(divisor))
        if done < stop:  # a NaN: torch finishes this part, with its own NaN bits
            flat_out[done:stop] = _torch_linear([f[done:stop] for f in flats], weights, divisor, params["normalize"])

    if parts == 1:
        run(0)
    else:
        with ThreadPoolExecutor(parts - 1) as pool:  # ctypes releases the GIL: the parts run in parallel
            others = [pool.submit(run, k) for k in range(1, parts)]
            run(0)
            for f in others:
                f.result()
    models.clear()
    return out


def _torch_linear(models: list[torch.Tensor], weights: torch.Tensor, divisor: torch.Tensor, normalize: bool) -> torch.Tensor:
    out = torch.zeros(models[0].shape, dtype=weights.dtype)
    for i, x in enumerate(models):
        out.addcmul_(x, weights[i])  # the same fused op as mergekit, so float32 results agree bit for bit
        models[i] = None  # type: ignore[call-overload]  # free each input as soon as it is added
    if normalize:
        out.div_(divisor)
    return out
