"""What vLLM makes of a quantised directory, decided statically from its config.json and tensor names.

vLLM (no CPU wheel here) is not installed, so this mirrors the rules its loaders apply, read from its source
(vllm/config/model.py `_verify_quantization`, model_executor/layers/quantization/compressed_tensors/
{compressed_tensors,utils}.py, model_executor/model_loader/bitsandbytes_loader.py):
- a quant_method it does not know (or none) raises "Unknown quantization method";
- compressed-tensors: the ignore list must treat the shards of a fused layer (q/k/v -> qkv_proj,
  gate/up -> gate_up_proj) alike, else it raises; a fused layer takes the scheme of the first shard's
  config group, so shards in different groups are read in the wrong layout (silently); a group must be
  weight-only int 4/8 pack-quantized per channel or group (WNA16) or fp8 float-quantized per channel
  (W8A16-FP8), else it raises;
- bitsandbytes 4-bit prequantised: every quantised Linear carries `weight.quant_state.bitsandbytes__nf4|fp4`,
  and a fused layer is skipped or quantised as a whole (a half-skipped one is read wrongly).
Returns "loads", "raises: ..." or "misreads: ..." (the case that must never happen).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
KNOWN_METHODS = {"compressed-tensors", "bitsandbytes", "gptq", "awq", "fp8", "gguf"}


def _matches(name: str, target: str) -> bool:
    return re.match(target[3:], name) is not None if target.startswith("re:") else target == name


def _fused_units(linear_names: Iterable[str]) -> list[list[str]]:
    units: dict[str, list[str]] = {}
    for name in linear_names:
        prefix, _, proj = name.rpartition(".")
        fused = next((f for f, shards in FUSED.items() if proj in shards), None)
        units.setdefault(f"{prefix}.{fused}" if fused else name, []).append(name)
    return list(units.values())


def _ct_group(name: str, qconfig: dict[str, Any]) -> str | None:
    for key, group in qconfig.get("config_groups", {}).items():
        if any(_matches(name, t) or t == "Linear" for t in group.get("targets", [])):
            return key
    return None


def _ct_scheme_ok(group: dict[str, Any], default_format: str | None) -> str | None:
    w, fmt = group.get("weights") or {}, group.get("format") or default_format
    if group.get("input_activations") is None and w.get("strategy") in ("channel", "group") and not w.get("dynamic"):
        if fmt == "pack-quantized" and w.get("type") == "int" and w.get("num_bits") in (4, 8):
            return None
        if fmt == "float-quantized" and w.get("type") == "float" and w.get("num_bits") == 8 and w.get("symmetric"):
            return None
    return f"no compressed-tensors scheme for weights {w} in format {fmt}"


def vllm_verdict(qconfig: dict[str, Any], linear_names: list[str], tensor_names: set[str]) -> str:
    method = str(qconfig.get("quant_method", "")).lower()
    if method not in KNOWN_METHODS:
        return f"raises: Unknown quantization method: {method!r}"
    if method == "compressed-tensors":
        ignore = qconfig.get("ignore") or []
        for unit in _fused_units(linear_names):
            ignored = {any(_matches(n, t) for t in ignore) for n in unit}
            if len(ignored) > 1:
                return f"raises: different schemes for the shards of {unit}"
            if ignored == {True}:
                continue
            groups = {_ct_group(n, qconfig) for n in unit}
            if None in groups:
                return f"misreads: {unit} has shards in no config group"
            if len(groups) > 1:
                return f"misreads: the shards of {unit} are in config groups {sorted(groups)}; vLLM reads all as the first"
            problem = _ct_scheme_ok(qconfig["config_groups"][groups.pop()], qconfig.get("format"))
            if problem:
                return f"raises: {problem}"
        return "loads"
    if method == "bitsandbytes":
        if not qconfig.get("load_in_4bit"):
            return "raises: only 4-bit prequantised bitsandbytes is checked here"
        for unit in _fused_units(linear_names):
            quantised = {any(f"{n}.weight.quant_state.bitsandbytes__{t}" in tensor_names for t in ("nf4", "fp4")) for n in unit}
            if len(quantised) > 1:
                return f"misreads: {unit} is partly quantised"
        return "loads"
    return f"raises: mlc never writes {method}"
