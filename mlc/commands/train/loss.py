"""The language-model loss on masked targets, and held-out evaluation spread over the processes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mlc.commands.train.batches import PackedSamples, eval_shard
from mlc.distributed import dist as mdist

IGNORE = -100


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the token losses where mask is set (fp32): the caller divides by the global target count."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.masked_fill(~mask, IGNORE).flatten(), ignore_index=IGNORE, reduction="sum"
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, samples: PackedSamples, max_sequences: int, micro_batch_size: int, info: mdist.DistInfo, autocast
) -> dict[str, float]:
    """Mean held-out loss per target token and its perplexity, over the first max_sequences held-out sequences.

    Every process runs the same number of forward passes (FSDP gathers weights in each), padding its share
    with fully masked rows, so the figure is the same on any number of processes.
    """
    mine = eval_shard(len(samples), max_sequences, info.dp_rank, info.dp_size)  # a TP group evaluates one share
    longest = math.ceil(min(len(samples), max_sequences) / info.dp_size)
    n_batches = math.ceil(longest / micro_batch_size)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for b in range(n_batches):
        chunk = mine[b * micro_batch_size : (b + 1) * micro_batch_size]
        x, y, mask = samples.batch(chunk or [0])
        if not chunk:
            mask = torch.zeros_like(mask)
        x, y, mask = x.to(info.device), y.to(info.device), mask.to(info.device)
        with autocast():
            logits = model(x).logits
        total += torch.stack([summed_cross_entropy(logits, y, mask).double().cpu(), mask.sum().double().cpu()])
    model.train(was_training)
    total = mdist.all_reduce_sum((total * info.data_weight).to(info.device)).cpu()
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
