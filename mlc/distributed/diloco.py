"""DiLoCo (2311.08105; INTELLECT-1, 2412.01152): data parallelism that communicates once every H steps.

Each worker trains its own copy of the model with the usual inner optimizer (AdamW) on its share of every batch, with
no gradient all-reduce. Every `inner_steps` steps the workers average their pseudo-gradients

    delta_w = theta_outer - theta_w          (how far worker w moved from the last shared weights)

and apply one outer step to the shared weights with SGD, Nesterov momentum (lr 0.7, momentum 0.9 in both papers):

    m <- mu * m + delta;   theta_outer <- theta_outer - lr * (delta + mu * m)

after which every worker continues from theta_outer (its inner optimizer state is kept, as in the papers).

INTELLECT-1 sends the pseudo-gradients as uint8 with a per-tensor min-max scale (4x fewer bytes than fp32). Summing
uint8 values would overflow, so they are all-gathered (every worker receives every other worker's bytes, what a ring
all-reduce of the same width would move) and each worker dequantises and averages them in rank order: the averages,
and hence the shared weights, are bitwise the same on every worker.

The state that must survive a restart differs per worker (its weights between syncs, its inner optimizer moments):
`DiLoCo` is a Stateful whose per-worker part sits under a key of its own (`rank<r>`), so DCP writes each worker's copy
instead of keeping one copy of what it takes for replicated tensors. Such a checkpoint resumes on the same number of
workers only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def quantize_uint8(x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """x as uint8 codes with its minimum and step: x ~= low + code * step (error at most step / 2)."""
    # Rounded to fp32 first: they travel as fp32, and the codes must be those of the scales every worker receives.
    low, high = x.min().item(), x.max().item()
    step = _fp32((high - low) / 255) if high > low else 1.0
    codes = ((x - low) / step).round_().clamp_(0, 255).to(torch.uint8)
    return codes, low, step


def _fp32(v: float) -> float:
    return torch.tensor(v, dtype=torch.float32).item()


def dequantize_uint8(codes: torch.Tensor, low: float, step: float) -> torch.Tensor:
    return codes.to(torch.float32) * step + low


class DiLoCo:
    def __init__(
        self, model: nn.Module, optimizers: list[torch.optim.Optimizer], inner_steps: int, outer_lr: float,
        outer_momentum: float, quantize: bool,
    ):
        import torch.distributed as dist

        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizers = optimizers
        self.inner_steps, self.quantize = inner_steps, quantize
        # The shared weights, kept in fp32 whatever the training dtype (the outer step adds small deltas to them).
        self.outer = [p.detach().to(torch.float32, copy=True).requires_grad_(True) for _, p in self.named]
        self.outer_opt = torch.optim.SGD(self.outer, lr=outer_lr, momentum=outer_momentum, nesterov=outer_momentum > 0)
        self.bytes_sent = 0  # payload this worker has contributed to the all-gathers (bytes)

    # ---- the outer step -------------------------------------------------------------------------------------------
    def after_step(self, done: int) -> bool:
        """Call after every inner optimizer step `done` (1-based); syncs and returns True every inner_steps steps."""
        if done % self.inner_steps:
            return False
        deltas = [o.detach() - p.detach().to(torch.float32) for o, (_, p) in zip(self.outer, self.named)]
        mean = self._average(deltas)
        for o, d in zip(self.outer, mean):
            o.grad = d
        self.outer_opt.step()
        self.outer_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for o, (_, p) in zip(self.outer, self.named):
                p.copy_(o)
        return True

    def _average(self, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        """The mean over workers of each pseudo-gradient (uint8 codes and per-tensor scales, or fp32)."""
        import torch.distributed as dist

        flat = torch.cat([d.reshape(-1) for d in deltas])
        if not self.quantize:
            payload = flat.clone()
            if dist.is_initialized():
                dist.all_reduce(payload, op=dist.ReduceOp.SUM)
            self.bytes_sent += flat.numel() * 4
            mean = payload / self.world
        else:
            codes, scales = [], []
            for d in deltas:
                c, low, step = quantize_uint8(d.reshape(-1))
                codes.append(c)
                scales += [low, step]
            mine = torch.cat(codes)
            mine_scales = torch.tensor(scales, dtype=torch.float32)  # exact: quantize_uint8 gives fp32 values
            self.bytes_sent += mine.numel() + mine_scales.nbytes
            if dist.is_initialized():
                all_codes = [torch.empty_like(mine) for _ in range(self.world)]
                all_scales = [torch.empty_like(mine_scales) for _ in range(self.world)]
                dist.all_gather(all_codes, mine)
                dist.all_gather(all_scales, mine_scales)
            else:
                all_codes, all_scales = [mine], [mine_scales]
            mean = torch.zeros_like(flat)
            for c, s in zip(all_codes, all_scales):  # rank order: every worker adds the same floats in the same order
                mean += self._dequantize(c, s, deltas)
            mean /= self.world
        out, offset = [], 0
        for d in deltas:
            out.append(mean[offset:offset + d.numel()].view_as(d))
            offset += d.numel()
        return out

    @staticmethod
    def _dequantize(codes: torch.Tensor, scales: torch.Tensor, like: list[torch.Tensor]) -> torch.Tensor:
        parts, offset = [], 0
        for i, d in enumerate(like):
            n = d.numel()
            parts.append(dequantize_uint8(codes[offset:offset + n], scales[2 * i].item(), scales[2 * i + 1].item()))
            offset += n
        return torch.cat(parts)

    # ---- checkpointing (a DCP Stateful) -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Copies, not the live tensors: DCP's load fills these in place, and the live weights are also the "model"
        # entry of the same checkpoint (one worker's copy of them); load_state_dict puts this worker's back afterwards.
        local: dict[str, Any] = {"params": {n: p.detach().clone() for n, p in self.named}}
        for j, opt in enumerate(self.optimizers):
            for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
                for key, value in opt.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor):
                        local[f"optim{j}.{i}.{key}"] = value.detach().clone()
        momentum = [self.outer_opt.state.get(o, {}).get("momentum_buffer") for o in self.outer]
        return {
            "outer": {n: o.detach() for (n, _), o in zip(self.named, self.outer)},
            "momentum": {n: (m if m is not None else torch.zeros_like(o)).detach() for (n, _), o, m in zip(self.named, self.outer, momentum)},
            "has_momentum": torch.tensor(float(momentum[0] is not None)),
            "bytes_sent": torch.tensor(self.bytes_sent, dtype=torch.int64),
            f"rank{self.rank}": local,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        local = state[f"rank{self.rank}"]
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(local["params"][n])
            for (n, _), o in zip(self.named, self.outer):
                o.copy_(state["outer"][n])
            for j, opt in enumerate(self.optimizers):
                for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
                    for key, value in opt.state.get(p, {}).items():
                        if isinstance(value, torch.Tensor):
                            value.copy_(local[f"optim{j}.{i}.{key}"])
        self.bytes_sent = int(state["bytes_sent"].item())
        if state["has_momentum"].item():
            for (n, _), o in zip(self.named, self.outer):
                self.outer_opt.state[o]["momentum_buffer"] = state["momentum"][n].clone()

    def finish(self, steps: int) -> None:
        """After the last step: one more outer step if the last round was cut short, so every worker ends equal."""
        if steps % self.inner_steps:
            self.after_step(self.inner_steps * (steps // self.inner_steps + 1))


def create(model: nn.Module, optimizers: list[torch.optim.Optimizer], config: Any, info: Any) -> DiLoCo | None:
    """The DiLoCo outer loop when the config asks for it (train.parallel = "diloco"), else None."""
    if config.train.parallel != "diloco":
        return None
    d = config.diloco
    return DiLoCo(model, optimizers, d.inner_steps, d.outer_lr, d.outer_momentum, d.quantize)


def check_resume(outer: DiLoCo | None, checkpoint: Any, world_size: int) -> None:
    """A DiLoCo checkpoint holds one model per worker: it resumes on the number of workers that wrote it."""
    import json

    from mlc.errors import InputError

    if outer is None:
        return
    saved = json.loads((checkpoint / "trainer.json").read_text())["world_size"]
    if saved != world_size:
        raise InputError(
            f"train.parallel: the DiLoCo checkpoint {checkpoint} was written by {saved} workers, this run has {world_size}",
            f"resume it on {saved} processes (each worker's own weights and optimizer state are in it)",
        )
