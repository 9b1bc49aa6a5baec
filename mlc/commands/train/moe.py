"""The Mixture-of-Experts terms of the loss, and how evenly the experts are used.

- Load balancing (Switch Transformer, 2101.03961; Mixtral/Qwen2-MoE in transformers): per sparse layer,
  E * sum_e f_e * P_e, with f_e the fraction of the k*T routing slots given to expert e and P_e its mean router
  probability. It is 1 for perfectly even routing; averaged over layers.
- Router z-loss (ST-MoE, 2202.08906): mean over tokens of logsumexp(router logits)^2, keeping logits small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    losses = []
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        experts = probs.shape[-1]
        chosen = torch.topk(probs, top_k, dim=-1).indices
        fraction = F.one_hot(chosen, experts).float().sum(dim=(0, 1)) / (chosen.numel())
        losses.append(experts * torch.sum(fraction * probs.mean(dim=0)))
    return torch.stack(losses).mean()


def z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.logsumexp(logits.float(), dim=-1).pow(2).mean() for logits in router_logits]).mean()


def expert_counts(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """(layers, experts) number of routing slots each expert received (no gradient)."""
    with torch.no_grad():
        rows = []
        for logits in router_logits:
            chosen = torch.topk(logits, top_k, dim=-1).indices
            rows.append(torch.bincount(chosen.flatten(), minlength=logits.shape[-1]).float())
        return torch.stack(rows)


def utilisation_metrics(counts: torch.Tensor) -> dict[str, list[float]]:
    """Per layer: each expert's share of the routing slots, and the max/min share ratio (None if one got none)."""
    share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    ratio = counts.max(dim=1).values / counts.min(dim=1).values
    return {
        "moe/expert_share": [[round(x, 4) for x in row] for row in share.tolist()],
        # JSON has no infinity: a layer with an idle expert reads null.
        "moe/max_min_ratio": [round(x, 3) if x != float("inf") else None for x in ratio.tolist()],
    }
