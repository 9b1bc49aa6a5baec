"""Router initialisation (random, hidden, cheap_embed) and the routing scale for softmax-then-top-k.

- random: N(0, 0.02), keyed by (seed, layer) as Drop-Upcycling does.
- hidden: each expert's row is the mean hidden state of its positive prompts minus that of its
  negative prompts, at the last token, normalised to unit length (mergekit-moe's "hidden" gates).
  The hidden state is the router's own input: the output of the layer's post-attention norm,
  computed by the dense base model in mlc.models.
- cheap_embed: the same from the mean input embedding of the prompts' tokens; one row for all layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mlc.commands.upcycle.options import ROUTER_STD
from mlc.commands.upcycle.prompts import ExpertPrompts
from mlc.rng import keyed_generator


def softmax_topk_scale(experts: int, top_k: int, granularity: int = 1) -> float:
    """Megatron's expert weight scale (E * G^2 / k)^(1/3) for softmax-before-top-k routing.

    A fresh router gives each expert a probability near 1/E, so the k chosen weights sum to about
    k/E; scaling gate, up and down of every expert by s multiplies a SwiGLU expert's output by about
    s^3 = E * G^2 / k, which brings the MoE output back to the dense MLP's magnitude (2410.07524).
    """
    return (experts * granularity**2 / top_k) ** (1 / 3)


def random_router(seed: int, layer: int, experts: int, hidden: int) -> torch.Tensor:
    return torch.empty(experts, hidden).normal_(0.0, ROUTER_STD, generator=keyed_generator(seed, "router", layer))


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _token_ids(tokenizer: Any, text: str, bos: int | None) -> list[int]:
    """The prompt's tokens, after BOS when given: a prompt is read as the start of a document."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return [bos, *ids] if bos is not None else ids


def hidden_routers(base: Path, prompts: list[ExpertPrompts]) -> list[torch.Tensor]:
    """One (experts, hidden) router per layer from the base model's last-token router inputs."""
    from mlc.models import load_model
    from mlc.models.tokenizer import load_tokenizer

    model = load_model(base, dtype=torch.float32)
    tokenizer = load_tokenizer(base)
    layers = model.model.layers
    captured: list[torch.Tensor | None] = [None] * len(layers)

    def keep(i: int):
        def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
            captured[i] = output[0, -1].detach()

        return hook

    handles = [layer.post_attention_layernorm.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    bos = tokenizer.bos_token_id  # mergekit-moe also puts the tokenizer's BOS first

    def mean_state(texts: list[str]) -> torch.Tensor:
        total = torch.zeros(len(layers), model.config.hidden_size)
        for text in texts:
            with torch.no_grad():
                model(torch.tensor([_token_ids(tokenizer, text, bos)]), skip_logits=True)
            total += torch.stack(captured)  # type: ignore[arg-type]
        return total / len(texts)

    try:
        rows = []
        for p in prompts:
            rows.append(mean_state(p.positive) - (mean_state(p.negative) if p.negative else 0.0))
    finally:
        for h in handles:
            h.remove()
    per_expert = torch.stack(rows)  # (experts, layers, hidden)
    return [_unit_rows(per_expert[:, i]) for i in range(len(layers))]


def cheap_embed_routers(base: Path, prompts: list[ExpertPrompts], layers: int) -> list[torch.Tensor]:
    """The same (experts, hidden) router for every layer, from mean token embeddings of the prompts.

    BOS is left out: its embedding is the same for every prompt and says nothing about the expert.
    """
    from mlc.io.safetensors_reader import ModelTensors
    from mlc.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(base)
    with ModelTensors(base) as tensors:
        embed = tensors.read("model.embed_tokens.weight", torch.float32)

    def mean_embedding(texts: list[str]) -> torch.Tensor:
        return torch.stack([embed[_token_ids(tokenizer, t, None)].mean(dim=0) for t in texts]).mean(dim=0)

    rows = torch.stack([mean_embedding(p.positive) - (mean_embedding(p.negative) if p.negative else 0.0) for p in prompts])
    router = _unit_rows(rows)
    return [router] * layers
