"""LoRA adapters served next to their base without folding: the base weights once, each request's adapter applied per row.

Every projection an adapter may target (q/k/v/o, gate/up/down of attention and dense MLPs; after fuse_projections the stacked
qkv_proj and gate_up_proj) is wrapped once by a LoraLinear. A step's flat batch carries, for each adapter
present, the rows of its requests' tokens; LoraLinear adds, per adapter, (x[rows] @ A^T) @ B^T at those
rows: one pair of small matmuls per adapter and module in a step, whatever mix of adapters the batch holds
(the segmented gather of Punica / S-LoRA, done with index_select / index_add on a CPU). Rows of requests
for the base model pay nothing but the wrapper's call. For a stacked module the adapter's A matrices of its
parts are stacked and its B matrices placed block-diagonally, so q, k and v still take one matmul pair.

Adapters are PEFT LoRA directories (adapter_config.json + adapter_model.safetensors, as `mlc train` and
peft save them; read by mlc.io.peft, as `mlc merge lora` reads them). The delta is scale * B @ A with scale = lora_alpha / r (alpha / sqrt(r) with rslora,
rank_pattern / alpha_pattern by module): the same delta `mlc merge lora` folds into the weights. What
cannot be applied as a low-rank term on a Linear (DoRA, embedding targets, modules_to_save, LoRA biases)
is refused when the adapter is loaded.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mlc.errors import InputError
from mlc.io.peft import read_adapter

# Each stacked module and the parts it was built from, in stacking order (mlc.models.transformer.fuse_projections).
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_ids = itertools.count(1)


@dataclass(eq=False)
class LoraAdapter:
    """One loaded adapter: per wrapped module name, (A of shape (r, in), B * scale of shape (out, r))."""

    name: str
    path: Path
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    uid: int = field(default_factory=lambda: next(_ids))  # salts the prefix cache: KV computed under another adapter differs

    @property
    def cache_salt(self) -> int:
        return hash(("lora", self.uid))


class LoraLinear(nn.Module):
    """A Linear (any kind: bf16, quantised, stacked) plus the low-rank terms of the adapters active in this step."""

    def __init__(self, base: nn.Module, key: str, batch: LoraBatch):
        super().__init__()
        self.base, self.key, self.batch = base, key, batch
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.batch.groups:
            return y
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        for adapter, rows in self.batch.groups:
            w = adapter.weights.get(self.key)
            if w is None:
                continue
            a, b = w
            xs = flat_x if rows is None else flat_x.index_select(0, rows)
            delta = (xs.to(a.dtype) @ a.T) @ b.T
            if rows is None:
                flat_y.add_(delta.to(y.dtype))
            else:
                flat_y.index_add_(0, rows, delta.to(y.dtype))
        return y


@dataclass
class LoraBatch:
    """The adapters of the step being run and the flat-batch rows of each (rows None: every row)."""

    groups: list[tuple[LoraAdapter, torch.Tensor | None]] = field(default_factory=list)


class LoraSet:
    """The served adapters by name, and the wrapped model they run on."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.batch = LoraBatch()
        self.adapters: dict[str, LoraAdapter] = {}
        self.modules: dict[str, nn.Module] = {}  # wrapped name -> the base module (for shapes)
        targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", *STACKED}
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if child_name in targets and "experts" not in full:  # routed experts (MoE) are not served with adapters
                    self.modules[full] = child
                    setattr(module, child_name, LoraLinear(child, full, self.batch))
        self.dtype = next(model.parameters()).dtype
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            self.dtype = torch.bfloat16

    def read(self, name: str, path: Path) -> LoraAdapter:
        """Read and check a PEFT adapter against the served model (InputError naming what does not fit)."""
        fold = "fold it into the model with `mlc merge lora` and serve that"
        try:
            peft = read_adapter(path)
        except InputError as e:
            raise InputError(f"LoRA {name}: {e.message}", e.hint) from None
        if problems := peft.problems():
            raise InputError(f"LoRA {name}: only plain LoRA adapters are served ({problems[0]})", fold)
        if others := sorted(set(peft.targets()) - set(peft.linear)):
            raise InputError(f"LoRA {name}: it changes {others[0]}, not with a LoRA pair of a Linear (embeddings, biases and "
                             "modules_to_save are not served unfolded)", fold)
        pieces: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # wrapped module -> part -> (A, B * scale)
        rank = 0
        for weight in peft.linear:
            module = weight.removesuffix(".weight")
            a, b = peft.linear_pair(weight)
            wrapped, part = self._place(module)
            if wrapped is None:
                raise InputError(f"LoRA {name}: targets {module}, which the served model has no Linear for", "check the adapter's base model")
            pieces.setdefault(wrapped, {})[part] = (a, b * peft.scale(module))
            rank = max(rank, a.shape[0])
        weights = {wrapped: self._stack(name, wrapped, by_part) for wrapped, by_part in pieces.items()}
        if not weights:
            raise InputError(f"LoRA {name}: {path} holds no LoRA matrices", "check the adapter directory")
        return LoraAdapter(name, path, weights, rank)

    def _place(self, module: str) -> tuple[str | None, str]:
        """(wrapped module name, part) for an unfused module name such as model.layers.0.self_attn.k_proj."""
        if module in self.modules:
            return module, ""
        parent, _, leaf = module.rpartition(".")
        for stacked, leaves in STACKED.items():
            if leaf in leaves and f"{parent}.{stacked}" in self.modules:
                return f"{parent}.{stacked}", leaf
        return None, ""

    def _stack(self, name: str, wrapped: str, by_part: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.modules[wrapped]
        leaf = wrapped.rpartition(".")[2]
        if "" in by_part:
            a, b = by_part[""]
            sizes = [base.out_features]
            order = [""]
        else:
            order = list(STACKED[leaf])
            sizes = _part_sizes(base.out_features, order, self.model, wrapped)
        in_features = base.in_features
        a_rows, blocks = [], []
        for part, out in zip(order, sizes):
            if part not in by_part:
                continue
            a, b = by_part[part]
            if a.shape[1] != in_features or b.shape[0] != out or a.shape[0] != b.shape[1]:
                module = f"{wrapped.rpartition('.')[0]}.{part}" if part else wrapped
                raise InputError(f"LoRA {name}: its A and B for {module} have shapes {list(a.shape)} and {list(b.shape)}; "
                                 f"the served model needs [r, {in_features}] and [{out}, r]", "the adapter was made for another base model")
            a_rows.append(a)
            blocks.append((sum(sizes[: order.index(part)]), b))
        a_all = torch.cat(a_rows)
        b_all = torch.zeros(base.out_features, a_all.shape[0])
        col = 0
        for row, b in blocks:
            b_all[row : row + b.shape[0], col : col + b.shape[1]] = b
            col += b.shape[1]
        return a_all.to(self.dtype).contiguous(), b_all.to(self.dtype).contiguous()

    def add(self, adapter: LoraAdapter) -> None:
        self.adapters[adapter.name] = adapter

    def remove(self, name: str) -> LoraAdapter | None:
        """Forget an adapter; requests already running with it finish with it (they hold it)."""
        return self.adapters.pop(name, None)


def _part_sizes(out_features: int, parts: list[str], model: nn.Module, wrapped: str) -> list[int]:
    """Output sizes of the parts of a stacked module, from the model's config."""
    c = model.config
    if parts[0] == "q_proj":
        return [c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.num_key_value_heads * c.head_dim]
    return [out_features // 2, out_features // 2]
