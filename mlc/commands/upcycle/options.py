"""UpcycleOptions: everything `mlc upcycle` was asked to do, as given (validated in validate.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ROUTERS = ("random", "hidden", "cheap_embed")
ROUTINGS = ("topk-softmax", "softmax-topk")
PROMPT_ROUTERS = ("hidden", "cheap_embed")
# Drop-Upcycling (2502.19261) initialises the router from N(0, 0.02); so does the random router here.
ROUTER_STD = 0.02
# The load-balancing coefficient written into config.json (Llama 3 meets MoE and Drop-Upcycling use 0.01-0.02).
AUX_LOSS_COEF = 0.01


@dataclass
class UpcycleOptions:
    base: str  # a model directory or a run reference (run:<id>, latest:merge)
    out: str | None  # None: the run's artifacts/model directory
    experts: int
    top_k: int
    shared_expert: bool = False  # Qwen2-MoE layout instead of Mixtral
    drop_ratio: float = 0.0
    expert_sources: list[str] = field(default_factory=list)
    shared_merge: str | None = None  # a merge method for attention, norms, embeddings (and the shared expert)
    merge_params: list[str] = field(default_factory=list)  # KEY=VALUE parameters of that method
    router: str = "random"
    expert_prompts: str | None = None
    routing: str = "topk-softmax"
    seed: int = 0
    dtype: str | None = None  # None: the base's stored dtype
    overwrite: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def layout(self) -> str:
        return "qwen2_moe" if self.shared_expert else "mixtral"
