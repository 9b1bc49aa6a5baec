"""Layer-by-layer calibration: one decoder block in memory at a time, quantised outputs fed forward.

For each block: load its weights, run the calibration hidden states through it once to gather what
the scheme needs about each Linear's inputs (X^T X for GPTQ and DAQ, per-feature max |x| for
LLM.int8), quantise its Linears, swap the quantised modules in, and run the block again: those
outputs, with the quantisation error of every block so far in them, are the next block's inputs.
A statistic that does not compensate earlier error (LLM.int8's outlier threshold) takes the original
block's outputs from the first run instead, which halves the forward passes and skips the slowest
one (LLM.int8's activation rounding). Peak memory is one block plus the hidden states (bf16),
whatever the model's depth. LLM.int8's maxima of a dense block come from a fused forward (calib_forward.py)
where its native kernels build; every other statistic hooks the block's own modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mlc.commands.quantize.calib_forward import GROUPS, FusedBlock, fused_block
from mlc.commands.quantize.memory import activations_on_heap
from mlc.io.safetensors_reader import ModelTensors
from mlc.kernels.quant_linear import quant_linear
from mlc.kernels.quant_weights import QuantWeight
from mlc.models.quant_load import set_module

COMPUTE_DTYPE = torch.bfloat16  # calibration forward passes: the CPU's fast GEMM
CHUNK_TOKENS = 4096  # tokens per forward chunk: bounds the MLP's intermediate activations


def shared(cache: dict[str, Any], kind: str, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """compute(x as [tokens, features]), once per input: q/k/v (and gate/up) are hooked on the very same tensor.

    The cache holds the latest input itself and compares by identity. A key made of the address would
    be wrong: gate/up's input has q/k/v's shape and can be allocated where q/k/v's was, once freed.
    """
    if cache.get("input") is not x:
        cache.clear()
        cache["input"] = x
    if kind not in cache:
        cache[kind] = compute(x.reshape(-1, x.shape[-1]))
    return cache[kind]


def _gram(x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return x32.T @ x32


class HessianStat:
    """X^T X / tokens over everything a Linear saw (the identity if it saw nothing, e.g. an unused expert)."""

    quantised_inputs = True  # GPTQ and DAQ compensate for the error of the blocks before: gather it on their outputs

    def __init__(self, k: int):
        self.sum = torch.zeros(k, k)
        self.tokens = 0

    def add(self, x: torch.Tensor, cache: dict[str, Any]) -> None:
        # In fp32: a bf16 product rounds every entry by 2^-9 of the largest ones, which breaks the
        # positive definiteness GPTQ's Cholesky needs when a few features are huge (SmolLM2 has them).
        self.sum += shared(cache, "xtx", x, _gram)
        self.tokens += x.numel() // x.shape[-1]

    def value(self) -> torch.Tensor:
        if self.tokens == 0:
            return torch.eye(self.sum.shape[0])
        return self.sum / self.tokens


def abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the rows of x [tokens, features], in float32.

    For 16- and 32-bit floats on the integer view with the sign bit cleared: an IEEE float's magnitude orders
    like its bits, so the integer maximum is the same number, and the integer reduction runs 1.4-2.5x faster
    than abs() followed by a bf16 amax (measured on [4096, 576] and [4096, 1536] bf16, one thread).
    """
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}.get(x.dtype)
    if bits is None:
        return x.abs().amax(dim=0).float()
    mask = 0x7FFF if bits == torch.int16 else 0x7FFFFFFF
    return (x.view(bits) & mask).amax(dim=0).view(x.dtype).float()


class AbsMaxStat:
    """max |x| per input feature over the calibration tokens."""

    quantised_inputs = False  # a threshold on the activations: the original model's are as good

    def __init__(self, k: int):
        self.max = torch.zeros(k)

    def add(self, x: torch.Tensor, cache: dict[str, Any]) -> None:
        torch.maximum(self.max, shared(cache, "absmax", x, abs_max), out=self.max)

    def value(self) -> torch.Tensor:
        return self.max


class HessianAbsMeanStat(HessianStat):
    """X^T X / tokens and mean |x| per input feature (AWQ's activation scale)."""

    def __init__(self, k: int):
        super().__init__(k)
        self.abs_sum = torch.zeros(k)

    def add(self, x: torch.Tensor, cache: dict[str, Any]) -> None:
        super().add(x, cache)
        self.abs_sum += shared(cache, "abssum", x, lambda x: x.float().abs().sum(dim=0))

    def value(self) -> tuple[torch.Tensor, torch.Tensor]:
        return super().value(), self.abs_sum / max(self.tokens, 1)


STATS = {"hessian": HessianStat, "absmax": AbsMaxStat, "hessian_absmean": HessianAbsMeanStat}
# A block-level transform before quantising (AWQ): (block prefix, read fp32, present, statistics by Linear, Linears)
# -> (changed tensors by full name, a summary). Changed Linear weights are what gets quantised; the others
# (norms, biases) replace the checkpoint's in the output.
Smooth = Callable[[str, Callable[[str], torch.Tensor], Callable[[str], bool], dict[str, Any], set[str]], tuple[dict[str, torch.Tensor], dict[str, Any]]]


@dataclass
class LayerJob:
    """How one Linear is quantised: the statistic it needs (None, "hessian", "absmax") and the function."""

    statistic: str | None
    quantize: Callable[[torch.Tensor, Any], QuantWeight]  # (fp32 weight [N, K], statistic value or None)


def _materialize(module: nn.Module, prefix: str, tensors: ModelTensors, dtype: torch.dtype) -> None:
    """Fill a module built on the meta device with its checkpoint tensors (assigned: nothing is allocated twice).

    Only a module with buffers the checkpoint does not hold is first made empty on the CPU: torch's empty_like
    of a meta tensor imports its symbolic-shape machinery (sympy, 0.34 CPU-seconds), which a block never needs.
    """
    state = {name: tensors.read(f"{prefix}{name}", dtype) for name in module.state_dict()}
    if any(name not in state for name, _ in module.named_buffers()):
        module.to_empty(device="cpu")
    module.load_state_dict(state, strict=True, assign=True)


class _Gathered(Exception):
    """Raised by the last statistic hook of a chunk whose outputs nobody reads: the rest of the forward is skipped."""


def _forward_chunks(run: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.empty_like(hidden)
    with activations_on_heap():
        for s in range(0, hidden.shape[0], rows):
            out[s : s + rows] = run(hidden[s : s + rows])
    return out


def _calibrate_stage(
    stage: nn.Module, names: dict[str, str], jobs: dict[str, LayerJob], run: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor, rows: int, tensors: Any, results: dict[str, Any], keep: Callable[[str, torch.Tensor, QuantWeight], Any],
    outputs: bool = True, smooth: tuple[Smooth, str, dict[str, torch.Tensor], dict[str, Any]] | None = None,
    fused: FusedBlock | None = None,
) -> torch.Tensor | None:
    """Gather statistics, quantise the stage's Linears, swap them in, and return the stage's new outputs.

    names maps a Linear's name inside the stage to its name in the checkpoint. smooth is (the transform, the
    stage's prefix, where its changed non-Linear tensors go, where its summary goes). fused, the stage's fused
    calibration forward, gathers LLM.int8's maxima instead of run where every statistic is one.
    """
    stats: dict[str, Any] = {}
    handles = []
    cache: dict[str, Any] = {}
    seen: set[str] = set()  # the Linears whose input this chunk has reached

    def gather(full: str, x: torch.Tensor) -> None:
        stats[full].add(x, cache)
        seen.add(full)
        if not outputs and len(seen) == len(stats):
            raise _Gathered  # e.g. the last block's down_proj GEMM and residual, or lm_head's logits

    for local, full in names.items():
        job = jobs[full]
        if job.statistic is not None:
            stats[full] = STATS[job.statistic](stage.get_submodule(local).in_features)
    # LLM.int8's maxima from the fused forward (calib_forward.py) where it runs this block; hooks on the module otherwise.
    maxima: dict[str, torch.Tensor] = {}
    group_of = {full: GROUPS.get(local) for local, full in names.items() if full in stats}
    if fused is not None and stats and all(type(stat) is AbsMaxStat for stat in stats.values()) and None not in group_of.values():
        for full, group in group_of.items():
            maxima.setdefault(group, torch.zeros_like(stats[full].max))
    else:
        for local, full in names.items():
            if full in stats:
                handles.append(stage.get_submodule(local).register_forward_pre_hook(lambda m, args, full=full: gather(full, args[0])))
    # Without error to compensate, the first run's outputs (the original block's) are the next inputs.
    reuse = outputs and bool(stats) and not any(type(stat).quantised_inputs for stat in stats.values())
    first_outputs = torch.empty_like(hidden) if reuse else None
    if maxima:
        assert fused is not None
        with activations_on_heap():
            for s in range(0, hidden.shape[0], rows):
                fused(hidden[s : s + rows], maxima, outputs, None if first_outputs is None else first_outputs[s : s + rows])
    elif stats:
        with activations_on_heap():
            for s in range(0, hidden.shape[0], rows):
                cache.clear()
                seen.clear()
                try:
                    y = run(hidden[s : s + rows])
                except _Gathered:
                    continue
                if first_outputs is not None:
                    first_outputs[s : s + rows] = y
            cache.clear()
    for h in handles:
        h.remove()
    if maxima:
        for full, group in group_of.items():
            torch.maximum(stats[full].max, maxima[group], out=stats[full].max)
    changed: dict[str, torch.Tensor] = {}
    if smooth is not None:
        fn, prefix, overrides, summary = smooth
        changed, chosen = fn(prefix, lambda n: tensors.read(n, torch.float32), lambda n: n in tensors,
                             {full: stat.value() for full, stat in stats.items()}, set(names.values()))
        summary.update(chosen)
        linear_weights = {f"{full}.weight" for full in names.values()}
        for name, t in changed.items():
            if name in linear_weights:
                continue
            overrides[name] = t
            stage.get_parameter(name[len(prefix):]).data = t.to(COMPUTE_DTYPE)  # the outputs run with it
    runs_again = outputs and first_outputs is None  # only then the quantised modules compute anything here
    # The quantisers' fp32 temporaries (a few MiB each, a dozen per Linear) reuse the heap too: mapped afresh for
    # each, LLM.int8's quantisation of a SmolLM2 block took 3.3x the CPU time (70 against 21 ms), most of it faults.
    with activations_on_heap():
        for local, full in names.items():
            linear = stage.get_submodule(local)
            weight = changed.get(f"{full}.weight")
            weight = tensors.read(f"{full}.weight", torch.float32) if weight is None else weight
            stat = stats[full].value() if full in stats else None
            q = jobs[full].quantize(weight, stat)
            if runs_again:
                bias = linear.bias.detach() if linear.bias is not None else None
                set_module(stage, local, quant_linear(q, bias))
            results[full] = keep(full, weight, q)
    if first_outputs is not None:
        return first_outputs
    return _forward_chunks(run, hidden, rows) if outputs else None


@torch.no_grad()
def quantize_layerwise(
    tensors: ModelTensors, model: nn.Module, tokens: torch.Tensor, jobs: dict[str, LayerJob],
    keep: Callable[[str, torch.Tensor, QuantWeight], Any], progress: Callable[[int, int], None] | None = None,
    smooth: Smooth | None = None, overrides: dict[str, torch.Tensor] | None = None, summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Quantise the Linears named in jobs, block by block over the calibration tokens [samples, seq_len].

    model is the architecture on the meta device: its blocks are filled from `tensors` one at a time.
    keep(name, fp32 weight, quantised weight) makes what is kept of each layer (its stored form), so
    nothing larger outlives its block. smooth transforms each decoder block first (AWQ); the tensors it
    changes besides the quantised weights go into overrides, its summary per block into summary.
    """
    from mlc.models.rope import RotaryTable

    config = model.config
    samples, seq_len = tokens.shape
    rows = max(1, CHUNK_TOKENS // seq_len)
    embed = tensors.read("model.embed_tokens.weight", COMPUTE_DTYPE)
    hidden = F.embedding(tokens, embed)  # [samples, seq_len, hidden] in bf16
    del embed
    positions = torch.arange(seq_len).unsqueeze(0)
    cos, sin = RotaryTable(config).cos_sin(positions, COMPUTE_DTYPE)
    results: dict[str, Any] = {}
    layers = model.model.layers
    total = len(layers) + 1
    last = max((i for i, _ in enumerate(layers) if any(n.startswith(f"model.layers.{i}.") for n in jobs)), default=-1)
    absmax_only = {job.statistic for job in jobs.values()} - {None} == {"absmax"}  # LLM.int8: the fused forward may run
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}."
        names = {n[len(prefix):]: n for n in jobs if n.startswith(prefix)}
        if names:
            _materialize(layer, prefix, tensors, COMPUTE_DTYPE)
            block_smooth = (smooth, prefix, overrides if overrides is not None else {}, summary if summary is not None else {}) if smooth else None
            needed = i < last or "lm_head" in jobs  # the last quantised block's outputs feed nothing that is quantised
            hidden = _calibrate_stage(layer, names, jobs, lambda h: layer(h, cos, sin)[0], hidden, rows, tensors, results, keep,
                                      outputs=needed, smooth=block_smooth, fused=fused_block(layer, cos, sin) if absmax_only else None)
        else:  # nothing to quantise here, but its outputs still feed the blocks that follow
            _materialize(layer, prefix, tensors, COMPUTE_DTYPE)
            hidden = _forward_chunks(lambda h: layer(h, cos, sin)[0], hidden, rows)
        layers[i] = nn.Identity()  # free the block: its quantised weights are in results
        if progress:
            progress(i + 1, total)
        if hidden is None:  # past the last quantised block, nothing that follows is needed
            break
    if "lm_head" in jobs:
        norm, head = model.model.norm, model.lm_head
        _materialize(norm, "model.norm.", tensors, COMPUTE_DTYPE)
        head_stage = nn.ModuleDict({"norm": norm, "lm_head": nn.Linear(head.in_features, head.out_features, bias=False)})
        head_stage.lm_head.weight.requires_grad_(False)
        head_stage.lm_head.weight.data = tensors.read(
            "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight", COMPUTE_DTYPE
        )
        _calibrate_stage(head_stage, {"lm_head": "lm_head"}, jobs, lambda h: head_stage.lm_head(head_stage.norm(h)),
                         hidden, 1, _HeadTensors(tensors), results, keep, outputs=False)
    if progress:
        progress(total, total)
    return results


class _HeadTensors:
    """Reads lm_head.weight from the embeddings when the checkpoint ties them."""

    def __init__(self, tensors: ModelTensors):
        self.tensors = tensors

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name == "lm_head.weight" and name not in self.tensors:
            name = "model.embed_tokens.weight"
        return self.tensors.read(name, dtype)
