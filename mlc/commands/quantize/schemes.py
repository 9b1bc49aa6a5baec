"""The built-in quantisation schemes, registered as `mlc.quant_schemes.v1` plugins like a third party's.

Each is an mlc.contracts.QuantScheme: it checks and completes the user's options, says which
statistic of a Linear's calibration inputs it needs (none for round-to-nearest), and turns one fp32
weight (plus that statistic) into a quantised weight. `mixed` instead plans a different setting per layer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mlc.contracts import QuantScheme, SchemeOptions
from mlc.errors import MlcUsageError

INT4_GROUPS = (32, 64, 128)
CODEBOOK_GROUPS = (32, 64, 128, 256)


def _reject(name: str, options: SchemeOptions, allowed: set[str]) -> None:
    extra = sorted(set(options.given()) - allowed)
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise MlcUsageError(f"scheme {name} does not take {flags}", "`mlc quantize --help` lists which options each scheme takes")


def _group(name: str, value: int | None, default: int, allowed: tuple[int, ...]) -> int:
    g = default if value is None else value
    if g not in allowed:
        raise MlcUsageError(f"scheme {name} takes --group-size {', '.join(map(str, allowed))}, not {g}", "pick one of those")
    return g


# ---- option checks ---------------------------------------------------------------------------------
def _int8_options(o: SchemeOptions) -> SchemeOptions:
    _reject("int8", o, set())
    return replace(o, bits=8)


def _int4_options(o: SchemeOptions) -> SchemeOptions:
    _reject("int4", o, {"group_size", "asymmetric"})
    return replace(o, bits=4, group_size=_group("int4", o.group_size, 128, INT4_GROUPS))


def _nf4_options(o: SchemeOptions) -> SchemeOptions:
    _reject("nf4", o, {"group_size"})
    return replace(o, group_size=_group("nf4", o.group_size, 64, CODEBOOK_GROUPS), codebook="nf4")


def _fp4_options(o: SchemeOptions) -> SchemeOptions:
    _reject("fp4", o, {"group_size"})
    return replace(o, group_size=_group("fp4", o.group_size, 64, CODEBOOK_GROUPS), codebook="fp4")


def _fp8_options(o: SchemeOptions) -> SchemeOptions:
    _reject("fp8", o, set())
    return o


def _llm_int8_options(o: SchemeOptions) -> SchemeOptions:
    _reject("llm-int8", o, set())
    return o


def _gptq_options(o: SchemeOptions) -> SchemeOptions:
    _reject("gptq", o, {"group_size", "asymmetric", "bits", "act_order"})
    bits = o.bits or 4
    if bits not in (4, 8):
        raise MlcUsageError(f"gptq takes --bits 4 or 8, not {bits}", "use --bits 4 (default) or --bits 8")
    if bits == 8:
        if o.group_size is not None:
            raise MlcUsageError("gptq --bits 8 is per output channel and takes no --group-size", "drop --group-size")
        return replace(o, bits=8, act_order=_act_order(o))
    return replace(o, bits=4, group_size=_group("gptq", o.group_size, 128, INT4_GROUPS), act_order=_act_order(o))


def _act_order(o: SchemeOptions) -> bool:
    """On unless --no-act-order: on SmolLM2 int4 g64 it took GPTQ's perplexity increase from 0.78x RTN's
    to 0.50x (benchmarks/RESULTS.md) at the same speed, and with static groups the layout is unchanged."""
    return True if o.act_order is None else o.act_order


def _awq_options(o: SchemeOptions) -> SchemeOptions:
    _reject("awq", o, {"group_size", "asymmetric", "bits"})
    bits = o.bits or 4
    if bits not in (4, 8):
        raise MlcUsageError(f"awq takes --bits 4 or 8, not {bits}", "use --bits 4 (default) or --bits 8")
    if bits == 8:
        if o.group_size is not None:
            raise MlcUsageError("awq --bits 8 is per output channel and takes no --group-size", "drop --group-size")
        return replace(o, bits=8)
    return replace(o, bits=4, group_size=_group("awq", o.group_size, 128, INT4_GROUPS))


def _daq_options(o: SchemeOptions) -> SchemeOptions:
    _reject("daq", o, {"group_size", "codebook"})
    codebook = o.codebook or "nf4"
    if codebook not in ("nf4", "fp4"):
        raise MlcUsageError(f"daq takes --codebook nf4 or fp4, not {codebook}", "use --codebook nf4 (default) or fp4")
    return replace(o, group_size=_group("daq", o.group_size, 64, CODEBOOK_GROUPS), codebook=codebook)


def _q4_k_m_options(o: SchemeOptions) -> SchemeOptions:
    _reject("q4_k_m", o, set())
    return o


def _mixed_options(o: SchemeOptions) -> SchemeOptions:
    _reject("mixed", o, {"target_bits", "target_size"})
    if (o.target_bits is None) == (o.target_size is None):
        raise MlcUsageError("scheme mixed needs exactly one of --target-bits and --target-size", "e.g. --target-bits 4.5")
    if o.target_bits is not None and not 0 < o.target_bits <= 16:
        raise MlcUsageError(f"--target-bits {o.target_bits} is outside (0, 16]", "e.g. --target-bits 4.5")
    if o.target_size is not None and o.target_size <= 0:
        raise MlcUsageError(f"--target-size {o.target_size} is not a positive number of bytes", "e.g. --target-size 90000000")
    return o


# ---- quantisers --------------------------------------------------------------------------------------
def _rtn_int(w: Any, stat: Any, o: SchemeOptions) -> Any:
    from mlc.commands.quantize.rtn import quantize_int

    return quantize_int(w, o.bits, o.group_size, o.symmetric)


def _rtn_codebook(w: Any, stat: Any, o: SchemeOptions) -> Any:
    from mlc.commands.quantize.rtn import quantize_codebook

    return quantize_codebook(w, o.codebook, o.group_size)


def _fp8(w: Any, stat: Any, o: SchemeOptions) -> Any:
    from mlc.commands.quantize.rtn import quantize_fp8

    return quantize_fp8(w)


def _llm_int8(w: Any, stat: Any, o: SchemeOptions) -> Any:
    from mlc.commands.quantize.llm_int8 import quantize_llm_int8

    return quantize_llm_int8(w, stat)


def _gptq(w: Any, stat: Any, o: SchemeOptions) -> Any:
    from mlc.commands.quantize.gptq import quantize_gptq

    return quantize_gptq(w, stat, o.bits, o.group_size, o.symmetric, o.act_order)


def _awq_smooth(o: SchemeOptions) -> Any:
    from mlc.commands.quantize.awq import smooth_block

    return lambda prefix, read, present, stats, linears: smooth_block(prefix, read, present, stats, linears, o.bits, o.group_size, o.symmetric)


def _daq(w: Any, stat: Any, o: SchemeOptions) -> Any:
    from mlc.commands.quantize.daq import quantize_daq

    return quantize_daq(w, o.codebook, o.group_size, stat)


def _mixed_plan(*args: Any, **kwargs: Any) -> Any:
    from mlc.commands.quantize.mixed import plan_mixed

    return plan_mixed(*args, **kwargs)


INT8 = QuantScheme("int8", "int8 weights, one symmetric scale per output channel", None, _int8_options, _rtn_int)
INT4 = QuantScheme("int4", "int4 weights in groups of 32/64/128 (symmetric, or --asymmetric)", None, _int4_options, _rtn_int)
NF4 = QuantScheme("nf4", "QLoRA NormalFloat-4 code book, blockwise absmax (bitsandbytes' 4-bit layout)", None, _nf4_options,
                  _rtn_codebook, format="bitsandbytes")
FP4 = QuantScheme("fp4", "bitsandbytes' FP4 code book, blockwise absmax (bitsandbytes' 4-bit layout)", None, _fp4_options,
                  _rtn_codebook, format="bitsandbytes")
FP8 = QuantScheme("fp8", "float8 e4m3 weights with a per-channel scale", None, _fp8_options, _fp8)
LLM_INT8 = QuantScheme("llm-int8", "LLM.int8(): vector-wise int8 + fp16 outlier features (|x| >= 6 on calibration)",
                       "absmax", _llm_int8_options, _llm_int8, format="mlc")
GPTQ = QuantScheme("gptq", "GPTQ int4 (groups) or int8 on calibration data, act-order by default (--no-act-order)", "hessian", _gptq_options, _gptq)
AWQ = QuantScheme("awq", "AWQ: activation-aware input-channel scales searched on calibration data, then int4 (groups) or int8",
                  "hessian_absmean", _awq_options, _rtn_int, smooth=_awq_smooth)
DAQ = QuantScheme("daq", "density-aware scale/zero search for nf4/fp4 on calibration data", "hessian", _daq_options, _daq, format="mlc")
MIXED = QuantScheme("mixed", "per-layer int4/int8 by measured sensitivity to meet --target-bits/--target-size",
                    None, _mixed_options, None, plan=_mixed_plan)
# GGUF only: llama.cpp's own k-quant mix, quantised from the full-precision weights by the GGUF writer (gguf_out.py).
Q4_K_M = QuantScheme("q4_k_m", "llama.cpp's Q4_K_M GGUF mix (Q4_K, Q6_K for half of attn_v/ffn_down and the output) from the full-precision weights; --format gguf",
                     None, _q4_k_m_options, None, format="gguf")
