"""generate(): greedy or sampled decoding with the contiguous KV cache."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from mlc.models.kvcache import KVCache
from mlc.models.transformer import CausalLM


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (batch,) from last-position logits (batch, vocab): argmax at temperature 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first token always stays).
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.inference_mode()
def generate(
    model: CausalLM,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_ids: Iterable[int] = (),
    seed: int | None = None,
) -> list[list[int]]:
    """New token ids for each prompt row (stopping after an EOS token, which is included).

    prompt_ids is one prompt (a list of ids) or a (batch, seq) tensor of equal-length prompts.
    """
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    batch, prompt_len = ids.shape
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = KVCache(model.config, batch, prompt_len + max_new_tokens, dtype=next(model.parameters()).dtype, device=device)
    stop = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    step_input = ids
    for _ in range(max_new_tokens):
        logits = model(step_input, cache=cache, logits_to_keep=1).logits[:, -1]
        token = sample_next(logits, temperature, top_k, top_p, generator)
        for row, t in enumerate(token.tolist()):
            if not done[row]:
                out[row].append(t)
        done |= torch.isin(token, stop)
        if bool(done.all()):
            break
        step_input = token.unsqueeze(1)
    return out
