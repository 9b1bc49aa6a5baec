"""The quantisation-scheme contract: what an `mlc.quant_schemes.v1` plugin provides.

A scheme is a QuantScheme object (registered as `name = "module:OBJECT"`; discovery reports anything
else as broken). It checks and completes the user's options (`options`: fill defaults, raise
MlcUsageError for what it does not take), says which statistic of a Linear's calibration inputs it
needs (None for round-to-nearest, "hessian" for X^T X, "absmax" for max |x| per input column,
"hessian_absmean" for X^T X and mean |x|), and turns one fp32 weight [out, in] plus that statistic into
a quantised weight (`quantize`). A scheme may also transform each decoder block before its Linears are
quantised (`smooth`, AWQ's activation-aware scaling; see mlc/commands/quantize/layerwise.py). The result
must be one of the weight kinds in mlc.kernels.quant_weights (IntWeight, CodebookWeight, Fp8Weight,
OutlierInt8Weight): those are what the on-disk formats store and the serving kernels compute with.
`mixed` instead plans a different built-in setting per layer (`plan`).

No torch import here: schemes and their options are plain data, so listing them stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class SchemeOptions:
    """Everything a user can set on a scheme; None means "the scheme's default" (or "not given")."""

    group_size: int | None = None
    asymmetric: bool = False
    bits: int | None = None
    act_order: bool | None = None  # gptq's default is on; an explicit --no-act-order counts as given
    codebook: str | None = None
    target_bits: float | None = None
    target_size: int | None = None

    @property
    def symmetric(self) -> bool:
        return not self.asymmetric

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None and (v is not False or k == "act_order")}


@dataclass(frozen=True)
class QuantScheme:
    name: str
    summary: str
    statistic: str | None  # what calibration gathers per Linear: None, "hessian" (X^T X), "absmax" (max |x|)
    options: Callable[[SchemeOptions], SchemeOptions]  # fill defaults, reject what the scheme does not take
    quantize: Callable[[Any, Any, SchemeOptions], Any] | None  # (fp32 weight, statistic, options) -> QuantWeight
    plan: Callable[..., Any] | None = None  # mixed: per-layer settings before quantising (see quantize/mixed.py)
    smooth: Callable[..., Any] | None = None  # (options) -> a per-block transform before quantising (see quantize/awq.py)
    format: str = "compressed-tensors"  # or "bitsandbytes", "mlc": the layout its output uses

    @property
    def needs_calibration(self) -> bool:
        return self.statistic is not None or self.plan is not None
