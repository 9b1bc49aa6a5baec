"""On-disk layouts of quantised Linear weights, and the `quantization_config` that describes them.

Three layouts, chosen by what the weights are, so that every output opens correctly where users open
it or is refused there with an error, never loaded as a silently random model:

compressed-tensors (quant_method "compressed-tensors"): what vLLM and transformers (with the
`compressed-tensors` package) load. Integer weights use the pack-quantized format for both 4 and 8
bits (vLLM loads weight-only integers only from pack-quantized; its int-quantized path is for
quantised activations): per Linear `<name>.weight_packed` int32 [N, K*b/32] (value + 2^(b-1), element
i at bit i*b), `<name>.weight_scale` [N, groups], `<name>.weight_shape` int64 [2], and for asymmetric
weights `<name>.weight_zero_point` packed the same way along the output dimension. fp8 e4m3 uses
float-quantized: `<name>.weight` float8_e4m3fn and `<name>.weight_scale` [N, 1]. Each distinct
setting is one config group whose targets are the exact layer names (as regular expressions).

bitsandbytes 4-bit (quant_method "bitsandbytes", load_in_4bit): what transformers and vLLM load with
bitsandbytes, for plain NF4/FP4 code books (no zero point) in bitsandbytes' code order. Per Linear
`<name>.weight` uint8 [N*K/2, 1] (the row-major codes, two per byte, the even element in the HIGH
nibble), `<name>.weight.absmax` float32 [N*K/G], `<name>.weight.quant_map` float32 [16] (the code
book) and `<name>.weight.quant_state.bitsandbytes__<nf4|fp4>` (uint8 bytes of the JSON
{"quant_type", "blocksize", "dtype", "shape"}). Blocks of G run over the flattened weight, so with
G dividing K they are mlc's groups. Unquantised Linears are listed in llm_int8_skip_modules.

mlc (format_version 2): for what no standard layout stores (DAQ's zero points, LLM.int8()'s 16-bit
outlier columns with zero-point activation rows). Its quantization_config deliberately has no
quant_method: transformers then raises ("has no `quant_method` attribute") and vLLM raises ("Unknown
quantization method"), instead of building the model with every quantised Linear randomly initialised.
Everything is under the "mlc" key: {"format_version": 2, "scheme", "layers": {name: {"kind", ...}},
"ignore"}. Directories written with quant_method "mlc" and format_version 1 (the same entries at the
top level) still load.
  kind "codebook" (nf4/fp4, with DAQ's zero points): `<name>.weight_codes` uint8 [N, K/2], two 4-bit
    codes per byte with column 2j in the low nibble; `<name>.weight_scale` [N, K/G];
    `<name>.weight_zero` [N, K/G] when "zero" is true. w = codebook[code] * scale (+ zero), with the
    16 code book values listed in the layer's entry.
  kind "llm_int8": `<name>.weight` int8 [N, K] (zero in outlier columns), `<name>.weight_scale`
    [N, 1], `<name>.outlier_cols` int64 [n], `<name>.outlier_weight` fp16 [N, n]; the entry's
    "activations" says how the run time quantises activation rows: "zeropoint" or "absmax" (the
    default when absent).
  kind "int", "fp8" and "bnb4" entries use the compressed-tensors and bitsandbytes tensors above, so
  one mlc directory may mix kinds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mlc.errors import InputError, MlcError
from mlc.kernels import packing
from mlc.kernels.quant_weights import CODEBOOKS, CodebookWeight, Fp8Weight, IntWeight, OutlierInt8Weight, QuantWeight

MLC_FORMAT_VERSION = 2
BNB_TYPES = ("nf4", "fp4")
MLC_NOTE = ("mlc's own layout: no standard format stores these weights, so this quantization_config has no quant_method "
            "and transformers and vLLM refuse to load it; load it with mlc (mlc serve, mlc eval, mlc.models.load_model)")


@dataclass(frozen=True)
class LayerSpec:
    """How one Linear's weight is stored."""

    kind: str  # "int", "fp8", "bnb4" (bitsandbytes NF4/FP4), "codebook" (mlc's), "llm_int8"
    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    codebook: tuple[float, ...] | None = None
    codebook_name: str | None = None
    zero: bool = False
    activation_zero_point: bool = False  # llm_int8: activation rows quantised with a zero point


def spec_of(w: QuantWeight) -> LayerSpec:
    """How w is stored; MlcError for a weight class no layout stores (say, a plugin scheme's own class)."""
    if isinstance(w, IntWeight):
        return LayerSpec("int", w.bits, w.group_size, w.symmetric)
    if isinstance(w, Fp8Weight):
        return LayerSpec("fp8")
    if isinstance(w, CodebookWeight):
        values = tuple(float(v) for v in w.codebook.tolist())
        if _bnb_storable(w):
            return LayerSpec("bnb4", 4, w.group_size, True, values, w.name)
        return LayerSpec("codebook", 4, w.group_size, w.zero is None, values, w.name, w.zero is not None)
    if isinstance(w, OutlierInt8Weight):
        return LayerSpec("llm_int8", activation_zero_point=w.activation_zero_point)
    raise MlcError(
        f"a quantisation scheme returned a {type(w).__name__}, which no mlc layout stores",
        "a scheme's quantize() must return an IntWeight, CodebookWeight, Fp8Weight or OutlierInt8Weight "
        "(mlc.kernels.quant_weights); fix or uninstall the scheme plugin",
    )


def _bnb_storable(w: CodebookWeight) -> bool:
    """bitsandbytes stores a code book with an absmax per block and no zero point, in its own code order."""
    return (w.zero is None and w.name in BNB_TYPES and w.codes.shape[1] % w.group_size == 0
            and torch.equal(w.codebook.float(), torch.tensor(CODEBOOKS[w.name], dtype=torch.float32)))


# ---- tensors ---------------------------------------------------------------------------------------
def _bnb_tensors(name: str, w: CodebookWeight, dtype: str) -> dict[str, torch.Tensor]:
    codes = w.codes.reshape(-1)
    packed = (codes[0::2] << 4) | codes[1::2]
    state = {"quant_type": w.name, "blocksize": w.group_size, "dtype": dtype, "shape": list(w.shape)}
    return {
        f"{name}.weight": packed.to(torch.uint8).reshape(-1, 1).contiguous(),
        f"{name}.weight.absmax": w.scale.float().reshape(-1).contiguous(),
        f"{name}.weight.quant_map": w.codebook.float().contiguous(),
        f"{name}.weight.quant_state.bitsandbytes__{w.name}": torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8),
    }


def layer_tensors(name: str, w: QuantWeight, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """The tensors that store one quantised Linear, by their names in the checkpoint.

    dtype names the model's floating-point dtype, which bitsandbytes' quant state records as the dequantised dtype.
    """
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
    if isinstance(w, CodebookWeight) and _bnb_storable(w):
        return _bnb_tensors(name, w, dtype)
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
        words, (n, k), scale, zero_point = read_int_words(name, spec, read)
        return IntWeight(packing.unpack_int32(words, spec.bits, k), scale, zero_point, spec.bits, spec.group_size)
    if spec.kind == "fp8":
        return Fp8Weight(read(f"{name}.weight"), read(f"{name}.weight_scale"))
    if spec.kind == "bnb4":
        return _read_bnb(name, read)
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


def read_int_words(name: str, spec: LayerSpec, read: Callable[[str], torch.Tensor]
                   ) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor, torch.Tensor | None]:
    """One integer layer as stored: its packed int32 words [N, ceil(K*b/32)], its shape (N, K), its scale and its zero
    point (unpacked: it is small). The words stay packed, for a loader that lays them out for a kernel directly."""
    n, k = (int(v) for v in read(f"{name}.weight_shape").tolist())
    words = read(f"{name}.weight_packed")
    if words.dtype != torch.int32 or tuple(words.shape) != (n, -(-k * spec.bits // 32)):
        raise InputError(f"{name}.weight_packed is {words.dtype} {list(words.shape)}, but weight_shape {[n, k]} at {spec.bits} bits "
                         f"packs into int32 {[n, -(-k * spec.bits // 32)]}", "the quantised checkpoint is corrupt; quantise it again")
    zero_point = None
    if not spec.symmetric:
        zero_point = packing.unpack_int32(read(f"{name}.weight_zero_point").T.contiguous(), spec.bits, n).T.contiguous()
    return words, (n, k), read(f"{name}.weight_scale"), zero_point


def _read_bnb(name: str, read: Callable[[str], torch.Tensor]) -> CodebookWeight:
    kind = next((t for t in BNB_TYPES if _exists(read, f"{name}.weight.quant_state.bitsandbytes__{t}")), None)
    if kind is None:
        raise ValueError(f"{name} has no bitsandbytes quant_state (nf4 or fp4)")
    state = json.loads(bytes(read(f"{name}.weight.quant_state.bitsandbytes__{kind}").tolist()).decode())
    n, k = state["shape"]
    g = int(state["blocksize"])
    if _exists(read, f"{name}.weight.nested_absmax"):
        raise ValueError("bitsandbytes double quantisation (nested absmax) is not supported")
    if k % g:
        raise ValueError(f"{name}: bitsandbytes blocks of {g} straddle rows of {k}")
    packed = read(f"{name}.weight").reshape(-1)
    codes = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(-1)[: n * k].reshape(n, k)
    scale = read(f"{name}.weight.absmax").float().reshape(n, k // g)
    return CodebookWeight(codes, read(f"{name}.weight.quant_map").float(), scale, None, g, kind)


def _exists(read: Callable[[str], torch.Tensor], name: str) -> bool:
    try:
        read(name)
    except (KeyError, MlcError):
        return False
    return True


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


def quantization_config(specs: dict[str, LayerSpec], ignore: list[str], scheme: str, extra: dict[str, Any] | None = None,
                        dtype: str = "float32") -> dict[str, Any]:
    """config.json's quantization_config: compressed-tensors or bitsandbytes when one of them says it all, else mlc's.

    dtype names the model's floating-point dtype (bitsandbytes computes in it).
    """
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
    kinds = {(s.kind, s.codebook_name) for s in specs.values()}
    if len(kinds) == 1 and next(iter(kinds))[0] == "bnb4":
        return _bnb_config(next(iter(kinds))[1], sorted(specs), ignore, scheme, dtype, extra)
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
    # No quant_method on purpose: see the module docstring.
    return {"note": MLC_NOTE, "mlc": {"format_version": MLC_FORMAT_VERSION, "scheme": scheme, "layers": layers,
                                      "ignore": ignore, **(extra or {})}}


def _bnb_config(quant_type: str, layers: list[str], ignore: list[str], scheme: str, dtype: str,
                extra: dict[str, Any] | None) -> dict[str, Any]:
    """transformers' BitsAndBytesConfig for prequantised 4-bit weights, every unquantised Linear skipped by its full name."""
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "_load_in_4bit": True, "_load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": dtype, "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": ignore, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "mlc": {"scheme": scheme, "layers": layers, **(extra or {})},
    }


def _target_matches(target: str, name: str, module_type: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == module_type


def layer_specs(qconfig: dict[str, Any], linear_names: list[str]) -> dict[str, LayerSpec]:
    """Which of these Linear layers are quantised, and how, according to a quantization_config."""
    method = qconfig.get("quant_method")
    if method is None and isinstance(qconfig.get("mlc"), dict):
        qconfig = qconfig["mlc"]
        if qconfig.get("format_version") != MLC_FORMAT_VERSION:
            raise ValueError(f"mlc quantisation format version {qconfig.get('format_version')} is not {MLC_FORMAT_VERSION}")
        method = "mlc"
    elif method == "mlc" and qconfig.get("format_version") != 1:  # version 1 put the same entries at the top level
        raise ValueError(f"mlc quantisation format version {qconfig.get('format_version')} is not 1")
    if method == "bitsandbytes":
        return _bnb_specs(qconfig, linear_names)
    if method == "mlc":
        out = {}
        for name, e in qconfig["layers"].items():
            kind = e["kind"]
            if kind == "int":
                out[name] = LayerSpec("int", e["bits"], e["group_size"], e["symmetric"])
            elif kind == "codebook":
                out[name] = LayerSpec("codebook", 4, e["group_size"], not e["zero"], tuple(e["values"]), e["codebook"], e["zero"])
            elif kind == "bnb4":
                out[name] = LayerSpec("bnb4", 4)
            elif kind == "llm_int8":
                activations = e.get("activations", "absmax")
                if activations not in ("absmax", "zeropoint"):
                    raise ValueError(f"llm_int8 activations {activations!r} is not absmax or zeropoint")
                out[name] = LayerSpec(kind, activation_zero_point=activations == "zeropoint")
            else:
                out[name] = LayerSpec(kind)
        return out
    if method != "compressed-tensors":
        raise ValueError(f"quant_method {method!r} is not one mlc reads (compressed-tensors, bitsandbytes 4-bit or mlc)")
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


def _bnb_specs(qconfig: dict[str, Any], linear_names: list[str]) -> dict[str, LayerSpec]:
    """The layers of a bitsandbytes 4-bit checkpoint: those mlc listed, or every Linear not skipped (vLLM's rule)."""
    if not qconfig.get("load_in_4bit"):
        raise ValueError("bitsandbytes 8-bit checkpoints are not supported; mlc reads bitsandbytes 4-bit (nf4, fp4)")
    if qconfig.get("bnb_4bit_use_double_quant"):
        raise ValueError("bitsandbytes double quantisation (bnb_4bit_use_double_quant) is not supported")
    listed = (qconfig.get("mlc") or {}).get("layers")
    if listed is not None:
        return {name: LayerSpec("bnb4", 4) for name in listed}
    skip = qconfig.get("llm_int8_skip_modules") or ["lm_head"]

    def skipped(name: str) -> bool:
        parts = name.split(".")
        prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
        return any(m in parts or m in prefixes for m in skip)

    return {name: LayerSpec("bnb4", 4) for name in linear_names if not skipped(name)}


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
