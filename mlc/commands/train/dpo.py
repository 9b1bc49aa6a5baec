"""Direct Preference Optimization (Rafailov et al., 2305.18290), with the reference model's log-probabilities
computed once per run and cached in it (what TRL's users ask for, trl#3985).

For a pair with prompt x, chosen y_w and rejected y_l, and log-probabilities summed over the response tokens:
    margin = beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)))
    loss   = -log sigmoid(margin)
The reference is the model the run starts from (for LoRA: the base, which is the starting policy as B = 0). Its
log-probabilities need one forward pass over the data before the first step; they go to <run>/dpo-reference/, so
a DPO step is one policy forward and backward, and a resumed run reads them instead of keeping a second model.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mlc.commands.train.preference import PreferencePairs
from mlc.commands.train.step import Trainer
from mlc.distributed import dist as mdist
from mlc.errors import InputError
from mlc.io.atomic import atomic_write_text

REFERENCE_DIR = "dpo-reference"
METRICS = ("margin", "accuracy", "reward_chosen", "reward_rejected")


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row: the sum of log p(target) over the masked positions, in fp32."""
    token = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(targets.shape)
    return (token * mask).sum(dim=1)


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, margin, rewards [m, 2]) per pair, from log-probs [m, 2] (chosen, rejected) of the policy and the reference."""
    rewards = beta * (policy - reference.to(policy))
    margin = rewards[:, 0] - rewards[:, 1]
    return -F.logsigmoid(margin), margin, rewards


class DpoTrainer(Trainer):
    """Trainer.train_step with the DPO loss: micro-batches are (inputs, targets, mask, reference) of 2m rows."""

    beta: float = 0.1

    def forward_backward_step(self, micro: list, n_pairs: torch.Tensor) -> tuple[torch.Tensor, None]:
        info = self.info
        loss_sum = torch.zeros((), device=info.device)
        sums = torch.zeros(len(METRICS), device=info.device)
        for m, (x, y, mask, reference) in enumerate(micro):
            _sync(self.model, m == len(micro) - 1)
            with self.autocast():
                logits = self.model(x).logits
            logps = sequence_logps(logits, y, mask).view(2, -1).T  # [pairs, (chosen, rejected)]
            losses, margin, rewards = dpo_terms(logps, reference, self.beta)
            # Scaled so that DDP/FSDP's mean over processes gives sum(pair losses) / pairs in the global batch.
            (losses.sum() * info.dp_size / n_pairs).sum().backward()
            loss_sum += losses.sum().detach()
            sums += torch.stack([margin.sum(), (margin > 0).float().sum(), rewards[:, 0].sum(), rewards[:, 1].sum()]).detach()
        self.sums = dict(zip(METRICS, sums))
        return loss_sum, None


def _sync(model: nn.Module, enabled: bool) -> None:
    from mlc.distributed import parallel

    parallel.sync_gradients(model, enabled)


@torch.no_grad()
def pair_logps(model: nn.Module, pairs: PreferencePairs, micro_batch_size: int, info: mdist.DistInfo, autocast) -> torch.Tensor:
    """[len(pairs), 2] summed response log-probs under `model`, every process taking a share (the same number of
    forward passes on each, as FSDP needs), summed over processes."""
    mine = list(range(len(pairs)))[info.dp_rank :: info.dp_size]  # a TP group computes one share
    n_batches = math.ceil(math.ceil(len(pairs) / info.dp_size) / micro_batch_size)
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for b in range(n_batches):
        chunk = mine[b * micro_batch_size : (b + 1) * micro_batch_size]
        x, y, mask = (t.to(info.device) for t in pairs.batch(chunk or [0])[:3])
        with autocast():
            logits = model(x).logits
        logps = sequence_logps(logits, y, mask).view(2, -1).T.double().cpu()
        if chunk and info.data_weight:
            out[chunk] = logps
    model.train(was_training)
    return mdist.all_reduce_sum(out.to(mdist.collective_device())).cpu()


def attach_reference(
    model: nn.Module, pairs: dict[str, PreferencePairs | None], run_path: Path, resumed: bool, micro_batch_size: int,
    info: mdist.DistInfo, autocast,
) -> float:
    """Give every split its reference log-probs: read from the run, or computed now with the starting model and
    written there by rank 0. Returns the seconds spent computing (0 when read)."""
    import time

    folder = run_path / REFERENCE_DIR
    started = time.perf_counter()
    computed = False
    for name, split in pairs.items():
        if split is None:
            continue
        path = folder / f"{name}.pt"
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            if saved.shape != (len(split), 2):
                raise InputError(f"{path} holds reference log-probs for {saved.shape[0]} pairs, the data has {len(split)}", "start a new run (checkpoint.resume = \"none\")")
            split.reference = saved
            continue
        if resumed:  # the trained policy is no longer the reference: never recompute from it
            raise InputError(f"{path} is missing: the reference log-probs of this run are gone", "start a new run (checkpoint.resume = \"none\")")
        split.reference = pair_logps(model, split, micro_batch_size, info, autocast)
        computed = True
        if info.is_main:
            folder.mkdir(exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(split.reference, tmp)
            tmp.replace(path)
            atomic_write_text(folder / "README.txt", "Reference log-probs (chosen, rejected) per pair, computed once with the starting model.\n")
    mdist.barrier()
    return time.perf_counter() - started if computed else 0.0


@torch.no_grad()
def evaluate_pairs(model: nn.Module, pairs: PreferencePairs, max_pairs: int, micro_batch_size: int, info: mdist.DistInfo, autocast, beta: float) -> dict[str, float]:
    """Held-out DPO loss, mean margin and accuracy (share of pairs with a positive margin) over the first max_pairs."""
    head = PreferencePairs(pairs.tokens, pairs.mask, pairs.offsets, pairs.first, min(len(pairs), max_pairs), pairs.reference[: min(len(pairs), max_pairs)])
    logps = pair_logps(model, head, micro_batch_size, info, autocast)
    losses, margin, _ = dpo_terms(logps, head.reference.double(), beta)
    return {"eval_loss": losses.mean().item(), "eval_margin": margin.mean().item(), "eval_accuracy": (margin > 0).double().mean().item()}
