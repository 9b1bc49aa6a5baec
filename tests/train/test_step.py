"""The public step API (Trainer.train_step) is one plain step: the mean token cross-entropy of the global batch,
its gradient accumulated over micro-batches, clipped, and an AdamW update, as a hand-written torch loop does it."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from mlc.commands.train.config import from_dict
from mlc.commands.train.optim import build_optimizers
from mlc.commands.train.step import Trainer
from mlc.distributed.dist import DistInfo
from mlc.models import build_model
from tests.conftest import TINY_CONFIGS


def test_a_train_step_matches_a_hand_written_loop():
    config = from_dict({"train": {"batch_size": 4, "micro_batch_size": 2, "grad_clip": 0.05}, "optim": {"lr": 1e-2}})
    model = build_model(dict(TINY_CONFIGS["llama"], architectures=["LlamaForCausalLM"]), seed=0, dtype=torch.float32).train()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 128, (4, 16), generator=g)
    y = torch.randint(0, 128, (4, 16), generator=g)
    mask = torch.rand(4, 16, generator=g) > 0.2
    micro = [(x[:2], y[:2], mask[:2]), (x[2:], y[2:], mask[2:])]
    n_targets = mask.sum().float().reshape(1)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    trainer = Trainer(model, build_optimizers(model, config.optim), config, model.config, info)
    loss_sum, grad_norm, counts = trainer.train_step(micro, n_targets)

    # The reference: one forward over the whole batch, masked mean cross-entropy, clip, torch's AdamW with weight
    # decay on matrices only (norm gains are not decayed: the nanoGPT convention mlc follows).
    matrices = [p for p in reference.parameters() if p.ndim >= 2]
    gains = [p for p in reference.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": gains, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    logits = reference(x).logits
    loss = F.cross_entropy(logits[mask], y[mask])
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    opt.step()
    assert counts is None
    assert torch.allclose(loss_sum / n_targets, loss.detach(), rtol=1e-5)
    assert torch.allclose(grad_norm, norm, rtol=1e-4)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
