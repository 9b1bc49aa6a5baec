"""GaLore (2403.03507): AdamW whose moments live in a rank-r projection of each weight matrix's gradient.

For a gradient G [m, n], every `update_proj_gap` steps (and at the first) an SVD of G gives the projection: the top
r right singular vectors P [r, n] when m >= n (low = G @ P.T, [m, r]), else the top r left ones Q [m, r]
(low = Q.T @ G, [r, n]). Adam's moments are kept for `low` only; the normalised update is projected back and scaled
by `scale`. That is the reference implementation's "std" projection and its AdamW (bias correction folded into
the step size, eps added to sqrt(v), decoupled weight decay after the update), written here over plain tensors so
that the state (moments, projection, step) checkpoints and resumes with DCP like torch's own optimizers; the
`galore-torch` package keeps its projector as a Python object in the state, which DCP cannot save.

Optimizer state per m x n matrix: 2 * r * max(m, n) for the moments plus r * min(m, n) for the projection, against
AdamW's 2 * m * n.
"""

from __future__ import annotations

import math

import torch


class GaLoreAdamW(torch.optim.Optimizer):
    def __init__(
        self, params, lr: float, rank: int, update_proj_gap: int, scale: float, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6, weight_decay: float = 0.0,
    ):
        defaults = {"lr": lr, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "betas": betas, "eps": eps,
                    "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # torch's signature
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                m, n = grad.shape
                right = m >= n
                if not state:
                    r = min(group["rank"], m, n)
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["projection"] = grad.new_zeros((r, n) if right else (m, r))
                    low_shape = (m, r) if right else (r, n)
                    state["exp_avg"] = grad.new_zeros(low_shape)
                    state["exp_avg_sq"] = grad.new_zeros(low_shape)
                step = int(state["step"])
                if step % group["update_proj_gap"] == 0:
                    state["projection"].copy_(_projection(grad, state["projection"].shape, right))
                proj = state["projection"]
                low = grad @ proj.T if right else proj.T @ grad
                state["step"] += 1
                t = step + 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(low, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
                step_size = group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                normalised = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
                update = (normalised @ proj if right else proj @ normalised) * group["scale"]
                p.add_(update, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def _projection(grad: torch.Tensor, shape: tuple[int, int], right: bool) -> torch.Tensor:
    """The top singular vectors of the gradient (SVD in fp32): P [r, n] (right) or Q [m, r] (left)."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    out = vh[: shape[0], :] if right else u[:, : shape[1]]
    return out.to(grad.dtype)


def state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes of every tensor in the optimizers' state (moments, projections, steps)."""
    return sum(t.numel() * t.element_size() for opt in optimizers for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))
