"""One optimizer config, three recipes: AdamW everywhere, Muon the Moonlight way (2502.16982), or GaLore (2403.03507).

Muon takes the 2-D weight matrices inside the transformer blocks, with `adjust_lr_fn="match_rms_adamw"` (update RMS
matched to AdamW's, 0.2*sqrt(max(A, B))) and decoupled weight decay, so AdamW's lr and weight decay carry over.
GaLore takes the same matrices (its reference projects only the blocks' linear layers) with AdamW's betas, eps and
weight decay. Embeddings, the output head and every 1-D parameter (norms, biases) stay on AdamW.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mlc.commands.train.config import OptimSection
from mlc.distributed.parallel import mesh_key

# Parameters that never take Muon even when they are 2-D: the token table and the output projection.
EMBEDDING_OR_HEAD = ("embed_tokens", "lm_head", "wte", "tok_embeddings", "output")


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    return param.ndim == 2 and not any(part in EMBEDDING_OR_HEAD for part in name.split("."))


def build_optimizers(model: nn.Module, cfg: OptimSection) -> list[torch.optim.Optimizer]:
    """The optimizers for the trainable parameters: [AdamW], [Muon, AdamW] or [GaLoreAdamW, AdamW]. Each group's base
    lr is `initial_lr`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    betas = (cfg.betas[0], cfg.betas[1])
    # One fused kernel per parameter group instead of a dozen foreach passes over memory (the same update, up to
    # rounding). FSDP2's sharded DTensors keep the foreach path.
    fused = bool(named) and not any(isinstance(p, DTensor) for _, p in named)
    # Tensor parallelism holds plain replicated tensors next to DTensors (and, with FSDP2, DTensors of two meshes):
    # torch's foreach kernels take one kind at a time, so the update loops over the tensors. The groups stay the same
    # as in every other layout, so a checkpoint resumes under any of them.
    foreach = False if len({mesh_key(p) for _, p in named}) > 1 else None

    def adamw_groups(params: list[tuple[str, torch.Tensor]]) -> list[dict]:
        # Weight decay only on matrices: decaying norm gains and biases toward zero hurts (GPT-2/nanoGPT convention).
        decay = [p for _, p in params if p.ndim >= 2]
        no_decay = [p for _, p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    if cfg.name == "adamw":
        optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(adamw_groups(named), lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused, foreach=foreach)]
    else:
        hidden = [p for n, p in named if is_hidden_matrix(n, p)]
        rest = [(n, p) for n, p in named if not is_hidden_matrix(n, p)]
        optimizers = []
        if hidden and cfg.name == "galore":
            from mlc.commands.train.galore import GaLoreAdamW

            optimizers.append(
                GaLoreAdamW(
                    hidden, lr=cfg.lr, rank=cfg.galore_rank, update_proj_gap=cfg.galore_update_proj_gap, scale=cfg.galore_scale,
                    betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                )
            )
        elif hidden:
            optimizers.append(
                torch.optim.Muon(
                    hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov,
                    ns_steps=cfg.ns_steps, adjust_lr_fn="match_rms_adamw",
                )
            )
        if rest:
            optimizers.append(torch.optim.AdamW(adamw_groups(rest), lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> float:
    """Scale every group's lr to initial_lr * factor; returns the peak-relative lr (for logging)."""
    lr = 0.0
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor
            lr = group["lr"]
    return lr
