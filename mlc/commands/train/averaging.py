"""Weight averages kept during training: EMA (Early Weight Averaging, 2306.03241) and LAWA (2209.14981).

- EMA: after every optimizer step, ema = decay * ema + (1 - decay) * weights, starting from the weights before
  the first step (torch's AveragedModel convention), kept in fp32.
- LAWA: every `lawa_interval` steps a copy of the weights goes into a ring of `lawa_k` slots; the LAWA weights are
  the mean of the filled slots (the k latest copies, spaced apart).

Only trainable tensors are averaged (LoRA: the adapters). The averages live next to the parameters, sharded the
same way (FSDP2 DTensors stay DTensors), and are part of the checkpoint, so a resumed run continues them exactly.
`swapped_in` puts one average into the model for an evaluation or an export and puts the weights back after.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from mlc.commands.train.config import AverageSection


class WeightAverages(Stateful):
    def __init__(self, model: nn.Module, cfg: AverageSection):
        self.cfg = cfg
        # Names as in the model's state dict (DDP's "module." dropped), so a run resumes at another world size.
        self.params = {n.removeprefix("module."): p for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            self.ema = {n: p.detach().float().clone() for n, p in self.params.items()} if cfg.ema else {}
            self.lawa = [{n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()} for _ in range(cfg.lawa_k)]
        self.lawa_taken = torch.zeros((), dtype=torch.int64)  # copies taken so far (the next slot is taken % k)

    @property
    def names(self) -> list[str]:
        """The averages this run keeps: "ema", "lawa"."""
        return (["ema"] if self.cfg.ema else []) + (["lawa"] if self.cfg.lawa_k else [])

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based)."""
        current = [p.detach() for p in self.params.values()]
        if self.ema:
            weights = [p if p.dtype == torch.float32 else p.float() for p in current]
            torch._foreach_lerp_(list(self.ema.values()), weights, 1.0 - self.cfg.ema_decay)
        if self.lawa and step % self.cfg.lawa_interval == 0:
            slot = self.lawa[int(self.lawa_taken) % len(self.lawa)]
            for name, p in zip(self.params, current):
                slot[name].copy_(p)
            self.lawa_taken += 1

    def ready(self, name: str) -> bool:
        return name == "ema" or (name == "lawa" and int(self.lawa_taken) > 0)

    @torch.no_grad()
    def average(self, name: str) -> dict[str, torch.Tensor]:
        if name == "ema":
            return self.ema
        filled = self.lawa[: min(int(self.lawa_taken), len(self.lawa))]
        return {n: _mean([slot[n] for slot in filled]) for n in self.params}

    @contextlib.contextmanager
    def swapped_in(self, name: str) -> Iterator[None]:
        """The model computes with the `name` average inside the block; its own weights come back after."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        averaged = self.average(name)
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(averaged[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])

    # ---- checkpoint ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {f"ema.{n}": t for n, t in self.ema.items()}
        for i, slot in enumerate(self.lawa):
            state.update({f"lawa{i}.{n}": t for n, t in slot.items()})
        if self.lawa:
            state["lawa_taken"] = self.lawa_taken
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for key, target in self.state_dict().items():
                if key == "lawa_taken":
                    self.lawa_taken = torch.as_tensor(state[key]).clone()
                else:
                    target.copy_(state[key])


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].clone()
    for t in tensors[1:]:
        total.add_(t)
    return total.div_(len(tensors))
