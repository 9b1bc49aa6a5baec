"""mlc's integer weights -> GGML blocks, keeping mlc's integers instead of rounding the weights again.

GGML's Q8_0 block is 32 int8 values with one fp16 scale, Q4_0 is 32 4-bit values v with w = d * (v - 8).
A symmetric mlc weight (int8 per channel or per group, int4 per group of 32/64/128, as written by int8,
int4, gptq and awq) is already such blocks: every 32-wide block lies inside one of mlc's groups, so
its scale is the group's and its integers are mlc's (int4: v = q + 8, q in [-8, 7]). The only change is
the scale's rounding to fp16 (mlc stores bf16 scales, which fp16 holds exactly above 2^-14).
Re-quantising the dequantised weights with gguf-py instead would round a second time (Q4_0 maps the
block's signed maximum to -8, a different grid) and lose what GPTQ/AWQ chose.
Asymmetric int4 would need Q4_1's fp16 offset m = -(8 + zero) * scale, which fp16 does not hold
exactly: it is refused rather than rounded silently.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mlc.errors import InputError

BLOCK = 32


def ggml_type(weight: Any, name: str) -> str:
    """"Q8_0" or "Q4_0" for an mlc IntWeight GGML stores exactly; InputError for anything else."""
    q = getattr(weight, "q", None)
    if q is None or not hasattr(weight, "bits"):
        raise InputError(f"{name} is not an integer weight ({type(weight).__name__}): GGUF export keeps integers only",
                         "quantise with --scheme int8, int4, gptq or awq for --format gguf")
    if weight.zero_point is not None:
        raise InputError(f"{name} is asymmetric int{weight.bits}: GGML's Q4_1 offset cannot hold its zero point exactly",
                         "drop --asymmetric for --format gguf")
    k = q.shape[1]
    group = weight.group_size or k
    if k % BLOCK or group % BLOCK:
        raise InputError(f"{name}: {k} input features in groups of {group} are not whole 32-wide GGML blocks",
                         "use --group-size 32/64/128 on layers whose width is a multiple of 32, or --exclude the layer")
    if weight.bits == 8:
        return "Q8_0"
    if weight.bits == 4:
        return "Q4_0"
    raise InputError(f"{name} is int{weight.bits}: GGUF export writes int8 (Q8_0) and int4 (Q4_0)", "use --bits 4 or 8")


def block_scales(weight: Any) -> torch.Tensor:
    """The fp16 scale of every 32-wide block, [N, K / 32]."""
    n, k = weight.q.shape
    group = weight.group_size or k
    return weight.scale.float().reshape(n, -1).repeat_interleave(group // BLOCK, dim=1).to(torch.float16)


def encode_int(weight: Any, name: str) -> tuple[np.ndarray, str]:
    """(the GGML blocks as bytes [N, K / 32 * block bytes], the type name) of an mlc IntWeight."""
    kind = ggml_type(weight, name)
    n, k = weight.q.shape
    d = block_scales(weight).numpy().view(np.uint8).reshape(n, k // BLOCK, 2)
    q = weight.q.to(torch.int8).numpy().reshape(n, k // BLOCK, BLOCK)
    if kind == "Q8_0":
        values = q.view(np.uint8)
    else:  # byte i holds value i in its low nibble and value i + 16 in its high one
        v = (q.astype(np.int16) + 8).astype(np.uint8)
        values = v[..., : BLOCK // 2] | (v[..., BLOCK // 2 :] << np.uint8(4))
    return np.concatenate([d, values], axis=-1).reshape(n, -1), kind
