"""Mixed precision: a bit width per layer chosen to meet a size budget, by measured sensitivity.

Each layer has candidate settings, all on fast kernels and in the compressed-tensors layout: int8
per channel and int4 in groups of 32, 64 and 128 (those that divide its input features). The
sensitivity of a layer to a setting is the increase of the calibration loss it causes, estimated
to second order from gradients measured on the calibration text:

    dL(layer, setting) ~ 1/2 * sum_ij F_ij (W_ij - Q(W)_ij)^2,   F = E[g^2] (the empirical Fisher).

(The first-order term vanishes at a trained model's minimum; F approximates the Hessian diagonal.)
Allocation is greedy, as in BitStack and the mixed-quantisation scaling laws (2410.23918,
2410.06722): start every layer at its largest setting and repeatedly take the step to a smaller one
that costs the least loss per byte saved, until the budget is met.

The layers that vLLM fuses into one (q/k/v into qkv_proj, gate/up into gate_up_proj, a layer's experts
into one fused MoE) get one setting together: vLLM reads a fused layer in the scheme of its first shard,
so shards in different settings would load as garbage there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlc.commands.quantize.rtn import quantize_int
from mlc.errors import InputError
from mlc.io.safetensors_reader import ModelTensors

FISHER_BATCH = 1  # sequences per backward pass
LOSS_CHUNK = 128  # positions whose logits exist at once in the Fisher pass


@dataclass(frozen=True)
class Candidate:
    label: str
    bits: int
    group_size: int | None


CANDIDATES = (Candidate("int8", 8, None), Candidate("int4-g32", 4, 32), Candidate("int4-g64", 4, 64), Candidate("int4-g128", 4, 128))


def candidates_for(k: int) -> list[Candidate]:
    return [c for c in CANDIDATES if c.group_size is None or k % c.group_size == 0]


class _Recomputed(nn.Module):
    """A decoder block whose activations are recomputed in the backward pass instead of kept."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args: Any) -> Any:
        return checkpoint(self.block, *args, use_reentrant=False)


def _next_token_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, with the head's logits made and recomputed LOSS_CHUNK positions at a time.

    Whole-window logits (512 x 49k in fp32, and their gradient) would be the largest tensors of the pass.
    """
    hidden = model(batch, skip_logits=True).last_hidden_state[:, :-1].flatten(0, 1)
    targets = batch[:, 1:].flatten()

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model.lm_head(h).float(), t, reduction="sum")

    total = sum(checkpoint(chunk_loss, hidden[i : i + LOSS_CHUNK], targets[i : i + LOSS_CHUNK], use_reentrant=False)
                for i in range(0, len(targets), LOSS_CHUNK))
    return total / len(targets)


def fisher_diagonal(model_dir: Any, tokens: torch.Tensor, names: list[str], progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """E[g^2] of each named Linear's weight over the calibration windows (batches of FISHER_BATCH), in bf16.

    Memory stays near the bf16 model plus these accumulators: blocks are recomputed in the backward
    pass, logits exist a chunk at a time, and each gradient is folded in and freed as soon as it exists.
    """
    from mlc.models import load_model

    model = load_model(model_dir, dtype=torch.bfloat16)
    model.requires_grad_(False)
    fisher = {}
    for name in names:
        w = model.get_submodule(name).weight
        w.requires_grad_(True)
        fisher[name] = torch.zeros(w.shape, dtype=torch.bfloat16)

        # Fold each gradient into F as soon as it exists, so the gradients of all layers never coexist.
        def fold(p: torch.Tensor, acc: torch.Tensor = fisher[name]) -> None:
            acc.add_(p.grad.square())
            p.grad = None

        w.register_post_accumulate_grad_hook(fold)
    blocks = model.model.layers
    for i, block in enumerate(blocks):
        blocks[i] = _Recomputed(block)
    batches = list(torch.split(tokens, FISHER_BATCH))
    for i, batch in enumerate(batches):
        _next_token_loss(model, batch).backward()
        if progress:
            progress(i + 1, len(batches))
    for f in fisher.values():
        f.div_(len(batches))
    return fisher


def sensitivity(weight: torch.Tensor, fisher: torch.Tensor, candidate: Candidate) -> tuple[float, int]:
    """(estimated loss increase, bytes on disk) of one layer at one setting."""
    q = quantize_int(weight, candidate.bits, candidate.group_size, symmetric=True)
    err = (weight.float() - q.dequantize()).square()
    return 0.5 * float((fisher.float() * err).sum()), q.storage_bits() // 8


FUSED_SHARDS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def fused_unit(name: str) -> str:
    """The name of the fused layer vLLM loads this Linear into (itself when it is not fused)."""
    if ".experts." in name:
        return name[: name.index(".experts.")] + ".experts"
    prefix, _, proj = name.rpartition(".")
    return f"{prefix}.{FUSED_SHARDS[proj]}" if proj in FUSED_SHARDS else name


def unit_costs(costs: dict[str, list[tuple[Candidate, float, int]]]) -> dict[str, list[tuple[Candidate, float, int]]]:
    """Costs per fused unit: the settings all its shards take, with their losses and bytes summed."""
    units: dict[str, list[str]] = {}
    for name in costs:
        units.setdefault(fused_unit(name), []).append(name)
    out = {}
    for unit, names in units.items():
        common = [c for c, _, _ in costs[names[0]] if all(any(c == d for d, _, _ in costs[n]) for n in names)]
        out[unit] = [(c, sum(l for n in names for d, l, _ in costs[n] if d == c), sum(b for n in names for d, _, b in costs[n] if d == c))
                     for c in common]
    return out


def allocate(costs: dict[str, list[tuple[Candidate, float, int]]], budget_bytes: int) -> dict[str, Candidate]:
    """Greedy: from each layer's largest setting, take the cheapest loss-per-byte-saved step until under budget."""
    order = {n: sorted(c, key=lambda t: -t[2]) for n, c in costs.items()}  # largest first
    at = {n: 0 for n in order}
    total = sum(order[n][0][2] for n in order)
    while total > budget_bytes:
        best, best_ratio = None, float("inf")
        for n, options in order.items():
            i = at[n]
            if i + 1 >= len(options):
                continue
            saved = options[i][2] - options[i + 1][2]
            if saved <= 0:
                continue
            ratio = (options[i + 1][1] - options[i][1]) / saved
            if ratio < best_ratio:
                best, best_ratio = n, ratio
        if best is None:
            break
        total -= order[best][at[best]][2] - order[best][at[best] + 1][2]
        at[best] += 1
    return {n: order[n][at[n]][0] for n in order}


def plan_mixed(
    model_dir: Any, tensors: ModelTensors, tokens: torch.Tensor, targets: dict[str, tuple[int, int]],
    target_bits: float | None, target_size: int | None, other_bytes: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, Candidate], dict[str, Any]]:
    """Per-layer settings meeting the budget, and a summary of the allocation for the report."""
    params = sum(n * k for n, k in targets.values())
    budget = int(target_bits * params / 8) if target_bits is not None else int(target_size) - other_bytes
    fisher = fisher_diagonal(model_dir, tokens, list(targets), progress)
    costs = {}
    for name in targets:
        w = tensors.read(f"{name}.weight" if f"{name}.weight" in tensors else "model.embed_tokens.weight", torch.float32)
        costs[name] = [(c, *sensitivity(w, fisher[name], c)) for c in candidates_for(w.shape[1])]
        del fisher[name]  # each layer's F is done with once costed
    layer_costs, costs = costs, unit_costs(costs)
    smallest = sum(min(b for _, _, b in c) for c in costs.values())
    if budget < smallest:
        what = f"--target-bits {target_bits}" if target_bits is not None else f"--target-size {target_size}"
        floor = smallest * 8 / params if target_bits is not None else smallest + other_bytes
        unit = "bits per parameter" if target_bits is not None else "bytes"
        raise InputError(f"{what} is below the smallest mixed allocation ({floor:.4g} {unit})", "raise the target, or use --exclude on fewer layers")
    chosen_units = allocate(costs, budget)
    chosen = {name: chosen_units[fused_unit(name)] for name in layer_costs}
    loss = sum(next(l for c, l, _ in layer_costs[n] if c == chosen[n]) for n in chosen)
    size = sum(next(b for c, _, b in layer_costs[n] if c == chosen[n]) for n in chosen)
    counts: dict[str, int] = {}
    for c in chosen.values():
        counts[c.label] = counts.get(c.label, 0) + 1
    info = {"budget_bytes": budget, "allocated_bytes": size, "bits_per_param": round(size * 8 / params, 4),
            "estimated_loss_increase": loss, "layers_per_setting": counts}
    return chosen, info
