"""The output layouts: which tensors a Mixtral or Qwen2-MoE checkpoint holds, and its config.json.

Tensor names are the ones on disk in the Hugging Face checkpoints of those architectures (what
transformers, vLLM, llama.cpp's converter and mlc.models read):

    Mixtral     model.layers.{i}.block_sparse_moe.gate.weight                 router (E, H)
                model.layers.{i}.block_sparse_moe.experts.{e}.w1|w3|w2.weight   gate | up | down
    Qwen2-MoE   model.layers.{i}.mlp.gate.weight                              router (E, H)
                model.layers.{i}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight
                model.layers.{i}.mlp.shared_expert.gate_proj|up_proj|down_proj.weight
                model.layers.{i}.mlp.shared_expert_gate.weight                (1, H)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mlc.commands.upcycle.options import AUX_LOSS_COEF, UpcycleOptions

DENSE_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
QKV_WEIGHT = re.compile(r"^(model\.layers\.\d+\.self_attn\.[qkv]_proj)\.weight$")
MIXTRAL_PROJ = {"gate": "w1", "up": "w3", "down": "w2"}
PROJS = ("gate", "up", "down")
# Keys of a Llama config.json that mean nothing (or something else) to the MoE architectures.
DENSE_ONLY_KEYS = ("attention_bias", "mlp_bias", "pretraining_tp", "_name_or_path", "_model_name_or_path", "auto_map")


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output, and where its values come from."""

    name: str
    shape: tuple[int, ...]
    kind: str  # shared | expert | shared_expert | router | shared_gate | zero_bias
    source: str | None = None  # the dense tensor it derives from
    layer: int = -1
    expert: int = -1
    proj: str | None = None  # gate | up | down for MLP weights


def expert_name(layout: str, layer: int, expert: int, proj: str) -> str:
    if layout == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{MIXTRAL_PROJ[proj]}.weight"
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight"


def router_name(layout: str, layer: int) -> str:
    block = "block_sparse_moe" if layout == "mixtral" else "mlp"
    return f"model.layers.{layer}.{block}.gate.weight"


def shared_expert_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.shared_expert.{proj}_proj.weight"


def shared_gate_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.shared_expert_gate.weight"


def plan_tensors(base_shapes: dict[str, tuple[int, ...]], opts: UpcycleOptions, hidden_size: int) -> list[OutTensor]:
    """Every output tensor in file order: the dense tensors, each MLP weight turned into E experts
    (plus the shared expert), a router per layer, and zero q/k/v biases where Qwen2-MoE wants them."""
    layout, n = opts.layout, opts.experts
    out: list[OutTensor] = []
    routed: set[int] = set()
    for name, shape in base_shapes.items():
        mlp = DENSE_MLP.match(name)
        if mlp is None:
            out.append(OutTensor(name, shape, "shared", source=name))
            qkv = QKV_WEIGHT.match(name)
            bias = f"{qkv.group(1)}.bias" if qkv else None
            if layout == "qwen2_moe" and bias is not None and bias not in base_shapes:
                # Qwen2-MoE loaders (vLLM, llama.cpp, older transformers) expect q/k/v biases; zeros keep the function.
                out.append(OutTensor(bias, (shape[0],), "zero_bias"))
            continue
        layer, proj = int(mlp.group(1)), mlp.group(2)
        if layer not in routed:
            routed.add(layer)
            out.append(OutTensor(router_name(layout, layer), (n, hidden_size), "router", layer=layer))
            if opts.shared_expert:
                out.append(OutTensor(shared_gate_name(layer), (1, hidden_size), "shared_gate", layer=layer))
        for e in range(n):
            out.append(OutTensor(expert_name(layout, layer, e, proj), shape, "expert", name, layer, e, proj))
        if opts.shared_expert:
            out.append(OutTensor(shared_expert_name(layer, proj), shape, "shared_expert", name, layer, -1, proj))
    return out


def moe_config(dense: Any, opts: UpcycleOptions, dtype_name: str) -> dict[str, Any]:
    """The output config.json: the dense model's (a ModelConfig), turned into the chosen MoE architecture."""
    changes: dict[str, Any] = dict(
        model_type=opts.layout,
        num_experts=opts.experts,
        num_experts_per_tok=opts.top_k,
        router_aux_loss_coef=AUX_LOSS_COEF,
        router_jitter_noise=0.0,
        extra={k: v for k, v in dense.extra.items() if k not in DENSE_ONLY_KEYS},
        torch_dtype=dtype_name,
    )
    if opts.layout == "qwen2_moe":
        changes.update(
            moe_intermediate_size=dense.intermediate_size,
            shared_expert_intermediate_size=dense.intermediate_size,
            norm_topk_prob=opts.routing == "topk-softmax",
            decoder_sparse_step=1,
            mlp_only_layers=[],
            qkv_bias=True,  # zero biases are written where the dense model has none
        )
        if dense.sliding_window is not None and dense.layer_types is None:
            # Qwen2-MoE would otherwise derive its own (alternating) pattern from max_window_layers.
            changes["layer_types"] = ["sliding_attention"] * dense.num_hidden_layers
    return dense.with_updates(**changes).to_hf()
