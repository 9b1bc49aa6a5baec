"""On-disk layouts of quantised Linear weights, and the `quantization_config` that describes them.

Two layouts, chosen by what the weights are:

compressed-tensors (quant_method "compressed-tensors"): what vLLM and transformers (with the
`compressed-tensors` package) load. Integer weights use the pack-quantized format for both 4 and 8
bits (vLLM loads weight-only integers only from pack-quantized; its int-quantized path is for
quantised activations): per Linear `<name>.weight_packed` int32 [N, K*b/32] (value + 2^(b-1), element
i at bit i*b), `<name>.weight_scale` [N, groups], `<name>.weight_shape` int64 [2], and for asymmetric
weights `<name>.weight_zero_point` packed the same way along the output dimension. fp8 e4m3 uses
float-quantized: `<name>.weight` float8_e4m3fn and `<name>.weight_scale` [N, 1]. Each distinct
setting is one config group whose targets are the exact layer names (as regular expressions).

mlc (quant_method "mlc", format_version 1): for schemes with no standard layout.
  kind "codebook" (nf4/fp4, with DAQ's zero points): `<name>.weight_codes` uint8 [N, K/2], two 4-bit
    codes per byte with column 2j in the low nibble; `<name>.weight_scale` [N, K/G];
    `<name>.weight_zero` [N, K/G] when "zero" is true. w = codebook[code] * scale (+ zero), with the
    16 code book values listed in the layer's entry.
  kind "llm_int8": `<name>.weight` int8 [N, K] (zero in outlier columns), `<name>.weight_scale`
    [N, 1], `<name>.outlier_cols` int64 [n], `<name>.outlier_weight` fp16 [N, n]; the entry's
    "activations" says how the run time quantises activation rows: "zeropoint" or "absmax" (the
    default when absent).
  kind "int" and "fp8" entries use the compressed-tensors tensors above, so one mlc directory may
  mix kinds. config: {"quant_method": "mlc", "format_version": 1, "scheme": ...,
  "layers": {name: {"kind": ..., ...}}, "ignore": [...]}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mlc.kernels import packing
from mlc.kernels.quant_weights import CodebookWeight, Fp8Weight, IntWeight, OutlierInt8Weight, QuantWeight

MLC_FORMAT_VERSION = 1


@dataclass(frozen=True)
class LayerSpec:
    """How one Linear's weight is stored."""

    kind: str  # "int", "fp8", "codebook", "llm_int8"
    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    codebook: tuple[float, ...] | None = None
    codebook_name: str | None = None
    zero: bool = False
    activation_zero_point: bool = False  # llm_int8: activation rows quantised with a zero point


def spec_of(w: QuantWeight) -> LayerSpec:
    if isinstance(w, IntWeight):
        return LayerSpec("int", w.bits, w.group_size, w.symmetric)
    if isinstance(w, Fp8Weight):
        return LayerSpec("fp8")
    if isinstance(w, CodebookWeight):
        values = tuple(float(v) for v in w.codebook.tolist())
        return LayerSpec("codebook", 4, w.group_size, w.zero is None, values, w.name, w.zero is not None)
    return LayerSpec("llm_int8", activation_zero_point=w.activation_zero_point)


# ---- tensors ---------------------------------------------------------------------------------------
def layer_tensors(name: str, w: QuantWeight) -> dict[str, torch.Tensor]:
    """The tensors that store one quantised Linear, by their names in the checkpoint."""
    if isinstance(w, IntWeight):
        out = {
            f"{name}.weight_packed": packing.pack_int32(w.q, w.bits),
            f"{name}.weight_scale": w.scale.contiguous(),
            f"{name}.weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
        }
        if w.zero_point is not None:
            out[f"{name}.weight_zero_point"] = packing.pack_int32(w.zero_point.T, w.bits).T.contiguous()
        return out
    if isinstance(w, Fp8Weight):
        return {f"{name}.weight": w.value, f"{name}.weight_scale": w.scale.reshape(-1, 1).contiguous()}
    if isinstance(w, CodebookWeight):
        out = {f"{name}.weight_codes": packing.pack_nibbles(w.codes), f"{name}.weight_scale": w.scale.contiguous()}
        if w.zero is not None:
            out[f"{name}.weight_zero"] = w.zero.contiguous()
        return out
    return {
        f"{name}.weight": w.q,
        f"{name}.weight_scale": w.scale.reshape(-1, 1).contiguous(),
        f"{name}.outlier_cols": w.outlier_cols.to(torch.int64),
        f"{name}.outlier_weight": w.outlier_weight.contiguous(),
    }


def read_layer(name: str, spec: LayerSpec, read: Callable[[str], torch.Tensor]) -> QuantWeight:
    """Rebuild one quantised weight from its stored tensors (read: tensor name -> tensor)."""
    if spec.kind == "int":
        n, k = (int(v) for v in read(f"{name}.weight_shape").tolist())
        q = packing.unpack_int32(read(f"{name}.weight_packed"), spec.bits, k)
        zero_point = None
        if not spec.symmetric:
            zero_point = packing.unpack_int32(read(f"{name}.weight_zero_point").T.contiguous(), spec.bits, n).T.contiguous()
        group = spec.group_size
        return IntWeight(q, read(f"{name}.weight_scale"), zero_point, spec.bits, group)
    if spec.kind == "fp8":
        return Fp8Weight(read(f"{name}.weight"), read(f"{name}.weight_scale"))
    if spec.kind == "codebook":
        zero = read(f"{name}.weight_zero") if spec.zero else None
        codebook = torch.tensor(spec.codebook, dtype=torch.float32)
        codes = packing.unpack_nibbles(read(f"{name}.weight_codes"))
        return CodebookWeight(codes, codebook, read(f"{name}.weight_scale"), zero, spec.group_size, spec.codebook_name or "custom")
    if spec.kind == "llm_int8":
        return OutlierInt8Weight(
            read(f"{name}.weight"), read(f"{name}.weight_scale"), read(f"{name}.outlier_cols"), read(f"{name}.outlier_weight"),
            spec.activation_zero_point,
        )
    raise ValueError(f"unknown layer kind {spec.kind!r}")


# ---- quantization_config ---------------------------------------------------------------------------
def _ct_weights(spec: LayerSpec) -> dict[str, Any]:
    if spec.kind == "fp8":
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "group_size": None,
                "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None, "observer_kwargs": {}}
    return {
        "num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
        "strategy": "group" if spec.group_size else "channel", "group_size": spec.group_size,
        "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None, "observer_kwargs": {},
    }


def _ct_format(spec: LayerSpec) -> str:
    return "float-quantized" if spec.kind == "fp8" else "pack-quantized"


def quantization_config(specs: dict[str, LayerSpec], ignore: list[str], scheme: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json's quantization_config for these quantised layers (compressed-tensors when it can say it all)."""
    if all(s.kind in ("int", "fp8") for s in specs.values()):
        groups: dict[LayerSpec, list[str]] = {}
        for name, spec in specs.items():
            groups.setdefault(spec, []).append(name)
        formats = {_ct_format(s) for s in groups}
        config_groups = {
            f"group_{i}": {
                "targets": [f"re:^{re.escape(n)}$" for n in names],
                "weights": _ct_weights(spec),
                "input_activations": None,
                "output_activations": None,
                "format": _ct_format(spec),
            }
            for i, (spec, names) in enumerate(groups.items())
        }
        return {
            "quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": config_groups,
            "ignore": ignore,
            "kv_cache_scheme": None,
            "sparsity_config": {},
            "mlc": {"scheme": scheme, **(extra or {})},
        }
    layers = {}
    for name, spec in specs.items():
        entry: dict[str, Any] = {"kind": spec.kind}
        if spec.kind == "int":
            entry.update(bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric)
        elif spec.kind == "codebook":
            entry.update(codebook=spec.codebook_name, values=list(spec.codebook or ()), group_size=spec.group_size, zero=spec.zero)
        elif spec.kind == "llm_int8":
            entry.update(activations="zeropoint" if spec.activation_zero_point else "absmax")
        layers[name] = entry
    return {"quant_method": "mlc", "format_version": MLC_FORMAT_VERSION, "scheme": scheme, "layers": layers,
            "ignore": ignore, **(extra or {})}


def _target_matches(target: str, name: str, module_type: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == module_type


def layer_specs(qconfig: dict[str, Any], linear_names: list[str]) -> dict[str, LayerSpec]:
    """Which of these Linear layers are quantised, and how, according to a quantization_config."""
    method = qconfig.get("quant_method")
    if method == "mlc":
        if qconfig.get("format_version") != MLC_FORMAT_VERSION:
            raise ValueError(f"mlc quantisation format version {qconfig.get('format_version')} is not {MLC_FORMAT_VERSION}")
        out = {}
        for name, e in qconfig["layers"].items():
            kind = e["kind"]
            if kind == "int":
                out[name] = LayerSpec("int", e["bits"], e["group_size"], e["symmetric"])
            elif kind == "codebook":
                out[name] = LayerSpec("codebook", 4, e["group_size"], not e["zero"], tuple(e["values"]), e["codebook"], e["zero"])
            elif kind == "llm_int8":
                activations = e.get("activations", "absmax")
                if activations not in ("absmax", "zeropoint"):
                    raise ValueError(f"llm_int8 activations {activations!r} is not absmax or zeropoint")
                out[name] = LayerSpec(kind, activation_zero_point=activations == "zeropoint")
            else:
                out[name] = LayerSpec(kind)
        return out
    if method != "compressed-tensors":
        raise ValueError(f"quant_method {method!r} is not one mlc reads (compressed-tensors or mlc)")
    ignore = qconfig.get("ignore") or []
    out = {}
    for name in linear_names:
        if any(_target_matches(t, name, "Linear") for t in ignore):
            continue
        for group in qconfig.get("config_groups", {}).values():
            if any(_target_matches(t, name, "Linear") for t in group.get("targets", [])):
                out[name] = _spec_from_ct(group, qconfig.get("format"))
                break
    return out


def _spec_from_ct(group: dict[str, Any], default_format: str | None) -> LayerSpec:
    w = group.get("weights") or {}
    fmt = group.get("format") or default_format
    if group.get("input_activations"):
        raise ValueError("quantised activations (W8A8 and the like) are not supported; mlc reads weight-only checkpoints")
    if w.get("type") == "float" and w.get("num_bits") == 8 and w.get("strategy") == "channel" and fmt == "float-quantized":
        return LayerSpec("fp8")
    if w.get("type") == "int" and fmt == "pack-quantized" and w.get("strategy") in ("group", "channel"):
        if w.get("actorder") == "group":
            raise ValueError("act-order with a g_idx permutation is not supported; quantise with static groups")
        return LayerSpec("int", int(w["num_bits"]), w.get("group_size") if w.get("strategy") == "group" else None, bool(w.get("symmetric", True)))
    raise ValueError(f"compressed-tensors weights {w} in format {fmt!r} are not supported")
