"""Perplexity with the sliding-window protocol of transformers' "Perplexity of fixed-length models".

Windows of `context` tokens start every `stride` tokens; each window scores only the tokens that
the previous window did not (the last `stride`, all of them in the first window), so every token
after the first is scored exactly once, with up to context - stride tokens of history.
stride == context gives disjoint windows (fast, less history); a smaller stride costs more forward
passes and gives a lower, more faithful perplexity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from mlc.data import eval_text_path
from mlc.errors import InputError
from mlc.models.transformer import CausalLM

DOC_SEPARATOR = "\n\n"
HELDOUT_TEXT = eval_text_path()  # the bundled held-out text: never seen by the demo's or tests' training


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens scored
    windows: int
    context: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window: tokens [begin, end) are input, the last `scored` are targets."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        # The window's first token has no history inside it, so it is never a target.
        out.append((begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.inference_mode()
def perplexity(
    model: CausalLM,
    token_ids: Sequence[int] | torch.Tensor,
    context: int = 1024,
    stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Perplexity:
    """Perplexity of one token stream under model; stride defaults to context // 2.

    progress(done, total) is called after each window, for progress bars.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    stride = stride or max(1, context // 2)
    limit = model.config.max_position_embeddings
    if not 2 <= context <= limit:
        raise InputError(f"context {context} is outside 2..{limit}", "the model's max_position_embeddings bounds it")
    if not 1 <= stride <= context:
        raise InputError(f"stride {stride} must be between 1 and the context {context}", "use --stride <= --context")
    if ids.numel() < 2:
        raise InputError("the evaluation text has fewer than 2 tokens", "give more text")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    plan = windows(ids.numel(), context, stride)
    for i, (begin, end, scored) in enumerate(plan):
        window = ids[begin:end].to(device).unsqueeze(0)
        # Only the last scored+1 positions' logits are needed: the head is the costliest layer here.
        logits = model(window, logits_to_keep=scored + 1).logits[0, :-1]
        targets = window[0, end - begin - scored :]
        total_nll += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        total_tokens += scored
        if progress is not None:
            progress(i + 1, len(plan))
    model.train(was_training)
    nll = total_nll / total_tokens
    return Perplexity(math.exp(nll), nll, total_tokens, len(plan), context, stride)


def tokenize_texts(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """One token stream: the documents joined by a blank line and tokenised at once (as transformers' recipe does)."""
    return tokenizer.encode(DOC_SEPARATOR.join(texts))
