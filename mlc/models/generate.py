"""generate(): greedy or sampled decoding with the contiguous KV cache.

Tokens are chosen by mlc.kernels.sampling, the sampler the server uses, so a seeded generate() and a
seeded request draw alike: each row has its own random stream (derived from the seed and the row).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from mlc.kernels.sampling import SamplingParams, SequenceSampler, sample
from mlc.models.kvcache import KVCache
from mlc.models.transformer import CausalLM


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
    params = SamplingParams(temperature=temperature, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p, seed=seed)
    samplers = [SequenceSampler(params, model.config.vocab_size, [], index=row) for row in range(batch)]
    cache = KVCache(model.config, batch, prompt_len + max_new_tokens, dtype=next(model.parameters()).dtype, device=device)
    stop = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    step_input = ids
    for _ in range(max_new_tokens):
        logits = model(step_input, cache=cache, logits_to_keep=1).logits[:, -1]
        # The sampler draws on the CPU (per-row CPU generators); the step syncs on the tokens anyway.
        token = torch.tensor([r.token for r in sample(logits.cpu(), samplers)], device=device)
        for row, t in enumerate(token.tolist()):
            if not done[row]:
                out[row].append(t)
        done |= torch.isin(token, stop)
        if bool(done.all()):
            break
        step_input = token.unsqueeze(1)
    return out
