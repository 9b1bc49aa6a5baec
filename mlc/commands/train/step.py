"""One training step as a small public API (torchtitan's Trainer.train_step / forward_backward_step):
`mlc train`'s loop runs it, and so can a script or a benchmark with the same numerics.

    micro, n_targets = step_batches(samples, order, step, accum, config, info)
    trainer = Trainer(model, optimizers, config, model.config, info, autocast=autocast(config.train.precision, info.device))
    loss_sum, grad_norm, counts = trainer.train_step(micro, n_targets)
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mlc.commands.train import moe
from mlc.commands.train.batches import PackedSamples, SampleOrder, micro_batch_positions
from mlc.commands.train.config import TrainConfig
from mlc.commands.train.loss import summed_cross_entropy
from mlc.distributed import dist as mdist
from mlc.distributed import parallel


def autocast(precision: str, device: torch.device) -> Callable[[], Any]:
    """A context-manager factory for the forward and the loss: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def step_batches(
    samples: PackedSamples | Any, order: SampleOrder, step: int, accum: int, config: TrainConfig, info: mdist.DistInfo,
    trace: str | None = None,
) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]:
    """This process's micro-batches (inputs, targets, mask[, ...]) for `step`, and what the global batch's loss is
    averaged over (target tokens; pairs for DPO).

    trace: a JSONL file to append {"step", "rank", "samples"} to per micro-batch (tests check the data position).
    """
    micro, local_targets = [], 0
    for m in range(accum):
        # Under tensor parallelism the processes of a TP group read the same samples: the data goes by dp_rank.
        positions = micro_batch_positions(step, m, info.dp_rank, info.dp_size, config.train.micro_batch_size, config.train.batch_size)
        indices = [order[p] for p in positions]
        if trace:
            with open(trace, "a") as f:
                f.write(json.dumps({"step": step, "rank": info.rank, "samples": indices}) + "\n")
        batch = samples.batch(indices)
        local_targets += samples.units(batch)  # counted on the host: no device sync before the forward
        micro.append(tuple(_to_device(t, info.device) for t in batch))
    counted = torch.tensor([local_targets * info.data_weight], device=info.device)  # each TP group's batch once
    return micro, mdist.all_reduce_sum(counted).clamp(min=1.0)


@dataclass
class Trainer:
    """What an optimizer step needs: the (wrapped) model, its optimizers, the config and the process's place."""

    model: torch.nn.Module
    optimizers: list[torch.optim.Optimizer]
    config: TrainConfig
    model_config: Any  # the native model's ModelConfig (the wrapped model may hide it)
    info: mdist.DistInfo
    loss_fn: Callable[..., torch.Tensor] = summed_cross_entropy
    autocast: Callable[[], Any] = contextlib.nullcontext

    def forward_backward_step(self, micro: list, n_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Accumulate the gradients of one optimizer step; returns the summed token loss and MoE routing counts."""
        mcfg, info = self.model_config, self.info
        loss_sum = torch.zeros((), device=info.device)
        counts = None
        top_k = mcfg.num_experts_per_tok
        for m, (x, y, mask) in enumerate(micro):
            parallel.sync_gradients(self.model, m == len(micro) - 1)  # reduce gradients once, after the last micro-batch
            with self.autocast():
                out = self.model(x, output_router_logits=mcfg.is_moe)
                ce = self.loss_fn(out.logits, y, mask)
                # Scaled so that DDP/FSDP's average over the data-parallel processes gives sum(token losses) / targets
                # in the global batch (the processes of a TP group each hold a part of one model: no average there).
                loss = ce * info.dp_size / n_targets
                if mcfg.is_moe and out.router_logits:
                    loss = loss + _moe_terms(self.config, out.router_logits, top_k) / len(micro)
                    c = moe.expert_counts(out.router_logits, top_k)
                    counts = c if counts is None else counts + c
            loss.backward()
            loss_sum += ce.detach()
        return loss_sum, counts

    def train_step(self, micro: list, n_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """forward_backward_step, gradient clipping and the optimizer step: (summed token loss, grad norm, MoE counts)."""
        loss_sum, counts = self.forward_backward_step(micro, n_targets)
        grad_norm = parallel.clip_grad_norm(self.model, self.config.train.grad_clip)
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return loss_sum, grad_norm, counts


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _moe_terms(config: TrainConfig, router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    total = torch.zeros((), device=router_logits[0].device)
    if config.moe.aux_loss_coef:
        total = total + config.moe.aux_loss_coef * moe.load_balancing_loss(router_logits, top_k)
    if config.moe.z_loss_coef:
        total = total + config.moe.z_loss_coef * moe.z_loss(router_logits)
    return total
