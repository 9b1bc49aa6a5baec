"""Layer-by-layer calibration: one decoder block in memory at a time, quantised outputs fed forward.

For each block: load its weights, run the calibration hidden states through it once to gather what
the scheme needs about each Linear's inputs (X^T X for GPTQ and DAQ, per-feature max |x| for
LLM.int8), quantise its Linears, swap the quantised modules in, and run the block again: those
outputs, with the quantisation error of every block so far in them, are the next block's inputs.
Peak memory is one block plus the hidden states (bf16), whatever the model's depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mlc.io.safetensors_reader import ModelTensors
from mlc.kernels.quant_linear import quant_linear
from mlc.kernels.quant_load import set_module
from mlc.kernels.quant_weights import QuantWeight

COMPUTE_DTYPE = torch.bfloat16  # calibration forward passes: the CPU's fast GEMM
CHUNK_TOKENS = 4096  # tokens per forward chunk: bounds the MLP's intermediate activations


class HessianStat:
    """X^T X / tokens over everything a Linear saw (the identity if it saw nothing, e.g. an unused expert)."""

    def __init__(self, k: int):
        self.sum = torch.zeros(k, k)
        self.tokens = 0

    def add(self, x: torch.Tensor, cache: dict[Any, torch.Tensor]) -> None:
        key = ("xtx", x.data_ptr(), tuple(x.shape))
        if key not in cache:  # q/k/v (and gate/up) share one input: one product serves them all
            # In fp32: a bf16 product rounds every entry by 2^-9 of the largest ones, which breaks the
            # positive definiteness GPTQ's Cholesky needs when a few features are huge (SmolLM2 has them).
            x32 = x.float()
            cache[key] = x32.T @ x32
        self.sum += cache[key]
        self.tokens += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.tokens == 0:
            return torch.eye(self.sum.shape[0])
        return self.sum / self.tokens


class AbsMaxStat:
    """max |x| per input feature over the calibration tokens."""

    def __init__(self, k: int):
        self.max = torch.zeros(k)

    def add(self, x: torch.Tensor, cache: dict[Any, torch.Tensor]) -> None:
        torch.maximum(self.max, x.abs().amax(dim=0).float(), out=self.max)

    def value(self) -> torch.Tensor:
        return self.max


STATS = {"hessian": HessianStat, "absmax": AbsMaxStat}


@dataclass
class LayerJob:
    """How one Linear is quantised: the statistic it needs (None, "hessian", "absmax") and the function."""

    statistic: str | None
    quantize: Callable[[torch.Tensor, Any], QuantWeight]  # (fp32 weight [N, K], statistic value or None)


def _materialize(module: nn.Module, prefix: str, tensors: ModelTensors, dtype: torch.dtype) -> None:
    state = {name: tensors.read(f"{prefix}{name}", dtype) for name in module.state_dict()}
    module.load_state_dict(state, strict=True, assign=True)


def _forward_chunks(run: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.empty_like(hidden)
    for s in range(0, hidden.shape[0], rows):
        out[s : s + rows] = run(hidden[s : s + rows])
    return out


def _calibrate_stage(
    stage: nn.Module, names: dict[str, str], jobs: dict[str, LayerJob], run: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor, rows: int, tensors: Any, results: dict[str, Any], keep: Callable[[str, torch.Tensor, QuantWeight], Any],
    outputs: bool = True,
) -> torch.Tensor | None:
    """Gather statistics, quantise the stage's Linears, swap them in, and return the stage's new outputs.

    names maps a Linear's name inside the stage to its name in the checkpoint.
    """
    stats: dict[str, Any] = {}
    handles = []
    cache: dict[Any, torch.Tensor] = {}
    for local, full in names.items():
        job = jobs[full]
        if job.statistic is None:
            continue
        linear = stage.get_submodule(local)
        stat = stats[full] = STATS[job.statistic](linear.in_features)
        handles.append(linear.register_forward_pre_hook(lambda m, args, stat=stat: stat.add(args[0].reshape(-1, args[0].shape[-1]), cache)))
    if stats:
        for s in range(0, hidden.shape[0], rows):
            cache.clear()
            run(hidden[s : s + rows])
        cache.clear()
    for h in handles:
        h.remove()
    for local, full in names.items():
        linear = stage.get_submodule(local)
        weight = tensors.read(f"{full}.weight", torch.float32)
        stat = stats[full].value() if full in stats else None
        q = jobs[full].quantize(weight, stat)
        bias = linear.bias.detach() if linear.bias is not None else None
        set_module(stage, local, quant_linear(q, bias))
        results[full] = keep(full, weight, q)
    return _forward_chunks(run, hidden, rows) if outputs else None


@torch.no_grad()
def quantize_layerwise(
    tensors: ModelTensors, model: nn.Module, tokens: torch.Tensor, jobs: dict[str, LayerJob],
    keep: Callable[[str, torch.Tensor, QuantWeight], Any], progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Quantise the Linears named in jobs, block by block over the calibration tokens [samples, seq_len].

    model is the architecture on the meta device: its blocks are filled from `tensors` one at a time.
    keep(name, fp32 weight, quantised weight) makes what is kept of each layer (its stored form), so
    nothing larger outlives its block.
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
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}."
        names = {n[len(prefix):]: n for n in jobs if n.startswith(prefix)}
        if names:
            layer.to_empty(device="cpu")
            _materialize(layer, prefix, tensors, COMPUTE_DTYPE)
            hidden = _calibrate_stage(layer, names, jobs, lambda h: layer(h, cos, sin)[0], hidden, rows, tensors, results, keep)
        else:  # nothing to quantise here, but its outputs still feed the blocks that follow
            layer.to_empty(device="cpu")
            _materialize(layer, prefix, tensors, COMPUTE_DTYPE)
            hidden = _forward_chunks(lambda h: layer(h, cos, sin)[0], hidden, rows)
        layers[i] = nn.Identity()  # free the block: its quantised weights are in results
        if progress:
            progress(i + 1, total)
    if "lm_head" in jobs:
        norm, head = model.model.norm, model.lm_head
        norm.to_empty(device="cpu")
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
