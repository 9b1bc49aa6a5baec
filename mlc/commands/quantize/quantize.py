"""Quantise an HF model directory into a quantised HF directory: the capability behind `mlc quantize`.

Inputs are checked before any work starts (bad input leaves no output). Round-to-nearest schemes
stream the checkpoint one tensor at a time; calibrated schemes go block by block (layerwise.py).
"""

from __future__ import annotations

import fnmatch
import functools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mlc.contracts import QuantScheme, SchemeOptions
from mlc.errors import InputError, MlcError, ValidationError
from mlc.io.hfdir import copy_tokenizer_files, read_config, write_config
from mlc.io.quant_format import LayerSpec, layer_tensors, quantization_config, spec_of
from mlc.io.safetensors_reader import ModelTensors
from mlc.io.safetensors_writer import ShardedWriter
from mlc.kernels.quant_weights import QuantWeight

# Routers pick experts from tiny logits differences; quantising them saves nothing worth the risk.
ROUTER_SUFFIXES = (".mlp.gate", ".block_sparse_moe.gate", ".shared_expert_gate")
Progress = Callable[[str, int, int], None]


@dataclass
class QuantizeRequest:
    model_dir: Path
    scheme: QuantScheme
    options: SchemeOptions
    exclude: list[str] = field(default_factory=list)
    quantize_head: bool = False
    calib_tokens: torch.Tensor | None = None  # [samples, seq_len], for calibrated schemes


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    setting: str
    bits_per_param: float
    relative_error: float  # ||W - W^|| / ||W|| (Frobenius)


@dataclass
class StoredLayer:
    """What is kept of a quantised layer until the output is written: its tensors as stored, and its report line."""

    spec: LayerSpec
    tensors: dict[str, torch.Tensor]
    report: LayerReport


@dataclass
class QuantizeResult:
    layers: list[LayerReport]
    specs: dict[str, LayerSpec]
    quantize_seconds: float
    plan: dict[str, Any] | None = None  # mixed's allocation, or AWQ's chosen scales per block


def meta_model(model_dir: Path) -> nn.Module:
    """The architecture on the meta device: names and shapes without any weights in memory.

    Without random initialisation: on the meta device torch runs nn.Embedding's normal_ through its Python
    decompositions, whose first use imports torch._dynamo (1.0 of the 1.1 CPU-seconds this took; nothing else in
    `mlc quantize` needs it). Linear's uniform_ has a native meta kernel and stays.
    """
    from unittest import mock

    from mlc.models.config import config_from_hf
    from mlc.models.transformer import CausalLM

    config = config_from_hf(read_config(model_dir))
    with torch.device("meta"), mock.patch.object(nn.init, "normal_", lambda tensor, *args, **kwargs: tensor):
        return CausalLM(config)


def check_not_quantized(model_dir: Path) -> None:
    qc = read_config(model_dir).get("quantization_config")
    if qc is not None:
        method = (qc.get("quant_method") or ("mlc" if "mlc" in qc else "unknown")) if isinstance(qc, dict) else "unknown"
        raise InputError(f"{model_dir} is already quantised (quant_method {method})", "quantise the original full-precision model instead")


def target_layers(model: nn.Module, exclude: list[str], quantize_head: bool) -> dict[str, tuple[int, int]]:
    """{name: (out, in)} of the Linears to quantise: the decoder blocks' projections and experts (not routers), and lm_head on request."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if name == "lm_head" and not quantize_head:
            continue
        if name != "lm_head" and (not name.startswith("model.layers.") or name.endswith(ROUTER_SUFFIXES)):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        out[name] = (m.out_features, m.in_features)
    return out


def check_groups(targets: dict[str, tuple[int, int]], group_size: int | None, scheme: str) -> None:
    """Every quantised layer's input features must split into whole groups."""
    if not group_size:
        return
    bad = sorted({k for _, k in targets.values() if k % group_size})
    if bad:
        widths = sorted({k for _, k in targets.values()})
        fits = [g for g in (256, 128, 64, 32) if all(k % g == 0 for k in widths)]
        names = [n for n, (_, k) in targets.items() if k % group_size]
        hint = f"use --group-size {fits[0]}" if fits else "pick a group size that divides every layer's input features"
        raise ValidationError(
            [f"--group-size {group_size} does not divide the input features ({', '.join(map(str, bad))}) of {len(names)} "
             f"{scheme} layers, e.g. {names[0]}"],
            hint=f"{hint}, or --exclude those layers",
        )


DEFAULT_GROUPS = (128, 64, 32)  # preferred first: fewer scales; 32 is the smallest every kernel and format takes


@dataclass
class GroupChoice:
    """The group size mlc picked because --group-size was not given, and why (for the report)."""

    group_size: int
    widths: list[int]

    def reason(self) -> str:
        return (f"the largest of {'/'.join(map(str, DEFAULT_GROUPS))} that divides every quantised layer's input features "
                f"({', '.join(map(str, self.widths))})")


def choose_group_size(scheme: QuantScheme, given: SchemeOptions, targets: dict[str, tuple[int, int]]) -> tuple[SchemeOptions, GroupChoice | None]:
    """The scheme's options with the group size that fits the model when the user gave none.

    A scheme that takes a group size accepts `group_size=g` in its options check; one that does not
    (int8, fp8, gptq --bits 8) rejects it, and keeps its own options.
    """
    if given.group_size is not None:
        return scheme.options(given), None
    widths = sorted({k for _, k in targets.values()})
    takes_groups = False
    for g in DEFAULT_GROUPS:
        try:
            options = scheme.options(replace(given, group_size=g))
        except MlcError:
            continue
        takes_groups = True
        if all(k % g == 0 for k in widths):
            return options, GroupChoice(g, widths)
    if not takes_groups:
        return scheme.options(given), None
    raise ValidationError(
        [f"no group size of {'/'.join(map(str, DEFAULT_GROUPS))} divides every {scheme.name} layer's input features "
         f"({', '.join(map(str, widths))})"],
        hint="--exclude the layers whose width no group divides, or give --group-size",
    )


def _relative_error(weight: torch.Tensor, q: QuantWeight) -> float:
    w = weight.float()
    return float((w - q.dequantize()).norm() / w.norm().clamp_min(1e-30))


def _setting(spec: LayerSpec) -> str:
    if spec.kind == "int":
        return f"int{spec.bits}" + (f"-g{spec.group_size}" if spec.group_size else "") + ("" if spec.symmetric else "-asym")
    if spec.kind in ("codebook", "bnb4"):
        return f"{spec.codebook_name}-g{spec.group_size}" + ("-daq" if spec.zero else "")
    return spec.kind


def stored_layer(name: str, weight: torch.Tensor, q: QuantWeight, dtype: str = "float32") -> StoredLayer:
    """Pack a quantised layer into its stored tensors at once: the fp32 weight and the unpacked integers go.

    dtype names the model's floating-point dtype (bitsandbytes' layout records it).
    """
    spec = spec_of(q)
    tensors = layer_tensors(name, q, dtype)
    bits = q.storage_bits()
    if spec.kind == "bnb4":  # bitsandbytes keeps the scales (absmax) in float32
        bits += q.scale.numel() * (32 - q.scale.element_size() * 8)
    report = LayerReport(name, tuple(q.shape), _setting(spec), bits / math.prod(q.shape), _relative_error(weight, q))
    return StoredLayer(spec, tensors, report)


def quantize_weights(req: QuantizeRequest, tensors: ModelTensors, model: nn.Module, targets: dict[str, tuple[int, int]],
                     other_bytes: int, progress: Progress | None, overrides: dict[str, torch.Tensor] | None = None,
                     ) -> tuple[dict[str, StoredLayer], dict[str, Any] | None]:
    """Quantise every target layer: stream for round-to-nearest, block by block when calibration is needed.

    A scheme that transforms blocks (AWQ) puts the other tensors it changes (norms) into overrides.
    """
    from mlc.commands.quantize.layerwise import LayerJob, quantize_layerwise

    scheme, options = req.scheme, req.options
    keep = functools.partial(stored_layer, dtype=model.config.torch_dtype)
    plan_info = None
    if scheme.plan is not None:
        from mlc.commands.quantize.rtn import quantize_int

        chosen, plan_info = scheme.plan(
            req.model_dir, tensors, req.calib_tokens, targets, options.target_bits, options.target_size, other_bytes,
            (lambda d, t: progress("measuring sensitivity", d, t)) if progress else None,
        )
        jobs = {n: LayerJob(None, lambda w, s, c=c: quantize_int(w, c.bits, c.group_size, True)) for n, c in chosen.items()}
    else:
        jobs = {n: LayerJob(scheme.statistic, lambda w, s: scheme.quantize(w, s, options)) for n in targets}
    if scheme.statistic is None:
        results = {}
        for i, name in enumerate(jobs):
            weight = _read_weight(tensors, name)
            results[name] = keep(name, weight, jobs[name].quantize(weight, None))
            if progress:
                progress("quantising", i + 1, len(jobs))
        return results, plan_info
    tick = (lambda d, t: progress("calibrating blocks", d, t)) if progress else None
    if scheme.smooth is None:
        return quantize_layerwise(tensors, model, req.calib_tokens, jobs, keep, tick), plan_info
    summary: dict[str, Any] = {}
    results = quantize_layerwise(tensors, model, req.calib_tokens, jobs, keep, tick, scheme.smooth(options),
                                 overrides if overrides is not None else {}, summary)
    return results, {"smoothed": summary} if summary else None


def _read_weight(tensors: Any, name: str) -> torch.Tensor:
    if name == "lm_head" and "lm_head.weight" not in tensors:
        return tensors.read("model.embed_tokens.weight", torch.float32)
    return tensors.read(f"{name}.weight", torch.float32)


def quantize_model(req: QuantizeRequest, out_dir: Path, progress: Progress | None = None) -> QuantizeResult:
    """Write the quantised directory into out_dir (a staging directory) and describe what was done."""
    check_not_quantized(req.model_dir)
    model = meta_model(req.model_dir)
    targets = target_layers(model, req.exclude, req.quantize_head)
    if not targets:
        what = f" left after --exclude {' '.join(req.exclude)}" if req.exclude else ""
        raise InputError(f"{req.model_dir} has no Linear layers to quantise{what}", "check the --exclude patterns (shell-style, on names like model.layers.0.mlp.down_proj)")
    check_groups(targets, req.options.group_size, req.scheme.name)
    if req.scheme.needs_calibration and req.calib_tokens is None:
        raise InputError(f"scheme {req.scheme.name} needs calibration text", "pass --calib FILE or keep the bundled default")
    start = time.perf_counter()
    with ModelTensors(req.model_dir) as tensors:
        quantized_names = {f"{n}.weight" for n in targets}
        other_bytes = sum(math.prod(tensors.info(n).shape) * tensors.info(n).dtype.itemsize
                          for n in tensors.names() if n not in quantized_names)
        overrides: dict[str, torch.Tensor] = {}
        results, plan_info = quantize_weights(req, tensors, model, targets, other_bytes, progress, overrides)
        seconds = time.perf_counter() - start
        specs = {n: r.spec for n, r in results.items()}
        _write(req, tensors, results, specs, out_dir, progress, overrides)
    return QuantizeResult([r.report for r in results.values()], specs, seconds, plan_info)


def _write(req: QuantizeRequest, tensors: ModelTensors, results: dict[str, StoredLayer], specs: dict[str, LayerSpec], out_dir: Path,
           progress: Progress | None = None, overrides: dict[str, torch.Tensor] | None = None) -> None:
    """The output directory: quantised tensors, the others copied (or replaced by overrides, in their stored dtype), config."""
    overrides = overrides or {}
    config = read_config(req.model_dir)
    quantized = {}
    for r in results.values():
        quantized.update(r.tensors)
    skip = {f"{n}.weight" for n in results}
    if "lm_head" in results:
        skip.add("lm_head.weight")  # a tied head is written as its own quantised tensors; the embeddings stay
        config["tie_word_embeddings"] = False
    copied = [n for n in tensors.names() if n not in skip]
    plan = [(n, t.dtype, tuple(t.shape)) for n, t in quantized.items()]
    plan += [(n, tensors.info(n).dtype, tuple(tensors.info(n).shape)) for n in copied]
    ignore = sorted(n for n, m in meta_model(req.model_dir).named_modules() if isinstance(m, nn.Linear) and n not in results)
    if config.get("tie_word_embeddings") and "lm_head" in ignore:
        ignore.remove("lm_head")  # a tied head has no tensor of its own to ignore; it is the embedding
        ignore.append("lm_head")
    with ShardedWriter(out_dir, plan) as writer:
        for name, t in quantized.items():
            writer.write(name, t)
        for i, name in enumerate(copied):
            writer.write(name, overrides[name].to(tensors.info(name).dtype) if name in overrides else tensors.read(name))
            if progress:
                progress("writing the other tensors", i + 1, len(copied))
    config["quantization_config"] = quantization_config(
        specs, sorted(ignore), req.scheme.name, {"options": req.options.given()} if req.options.given() else None,
        dtype=meta_model(req.model_dir).config.torch_dtype,
    )
    write_config(out_dir, config)
    copy_tokenizer_files(req.model_dir, out_dir)
