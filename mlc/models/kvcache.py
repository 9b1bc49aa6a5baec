"""The KV-cache protocol the model calls, causal attention without a cache, and a contiguous KVCache.

The protocol is deliberately small so a paged cache over a flat batch of sequences (serving) can
implement it too. In one forward pass the model calls:

    position_ids = cache.positions(input_ids)    # once, before the first layer (skipped if the caller passes positions)
    out = cache.attend(layer_idx, q, k, v, sliding_window=...)   # once per layer

q is (batch, q_heads, seq, head_dim) and k, v are (batch, kv_heads, seq, head_dim), RoPE already
applied; attend stores k and v and returns the attention output shaped like q. GQA (q_heads a
multiple of kv_heads, q head h reads kv head h // (q_heads // kv_heads)) and the sliding window
(key j is visible to query i when i - window < j <= i) are the cache's job, since only it knows
where each sequence's past keys live.

A cache may also offer `attend_projected(layer_idx, qkv, cos, sin, q_heads, sliding_window=...)`: the same output
from a layer's fused q/k/v projection before RoPE, or None when it cannot (the model then rotates and calls attend).
The serving engine's PagedBatch does, to run a decode step's rotation, cache write and attention in one native call.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from mlc.errors import MlcError
from mlc.kernels.attention import window_mask
from mlc.models.config import ModelConfig


@runtime_checkable
class AttentionCache(Protocol):
    def positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Positions (batch, seq) of the new tokens; claims their slots in the cache."""
        ...

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None = None
    ) -> torch.Tensor:
        """Store k, v for the new tokens and return attention of q over all the sequence's keys."""
        ...


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """Causal self-attention over one block of tokens with no past (training, scoring, prefill)."""
    t = q.shape[2]
    if sliding_window is None or t <= sliding_window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    pos = torch.arange(t, device=q.device)
    mask = window_mask(pos, pos, sliding_window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of a single new token over all keys: the decode step.

    With one query no mask is needed, and grouping the q heads that share a kv head as "n_rep
    queries" of that kv head runs GQA without materialising repeated keys.
    """
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    grouped = q.reshape(b, hkv, hq // hkv, d)
    if q.dtype == torch.float32 and q.device.type == "cpu":
        # PyTorch's CPU flash kernel costs ~0.15 ms per call in fp32 for this tiny product (and tens
        # of ms when the cores are oversubscribed); two small matmuls take ~0.03 ms either way.
        probs = torch.softmax(torch.matmul(grouped * d**-0.5, k.transpose(-1, -2)), dim=-1)
        out = torch.matmul(probs, v)
    else:
        out = F.scaled_dot_product_attention(grouped, k, v)
    return out.reshape(b, hq, 1, d)


class KVCache:
    """Keys and values of a batch of equal-length sequences in preallocated contiguous tensors.

    Decoding writes into slices of the preallocated tensors, so a step allocates nothing for the
    cache. `length` is the number of positions filled; set it lower to drop the tail (rewind).
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if max_length > config.max_position_embeddings:
            raise MlcError(
                f"a KV cache of {max_length} positions exceeds the model's {config.max_position_embeddings}",
                "generate fewer tokens or use a shorter prompt",
            )
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.batch_size = batch_size
        self.max_length = max_length
        self.length = 0
        self._start = 0
        self._arange = torch.arange(max_length, device=device)

    def positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        if self.length + t > self.max_length:
            raise MlcError(f"the KV cache holds {self.max_length} positions; {self.length + t} needed", "make a larger cache")
        self._start, self.length = self.length, self.length + t
        return self._arange[self._start : self.length].unsqueeze(0).expand(input_ids.shape[0], t)

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None = None
    ) -> torch.Tensor:
        start, end = self._start, self.length
        self.k[layer_idx][:, :, start:end] = k
        self.v[layer_idx][:, :, start:end] = v
        t = q.shape[2]
        lo = 0 if sliding_window is None else max(0, end - t + 1 - sliding_window)
        keys, values = self.k[layer_idx][:, :, lo:end], self.v[layer_idx][:, :, lo:end]
        if t == 1:
            return attend_one_query(q, keys, values)
        if start == 0 and lo == 0 and sliding_window is None:
            return causal_attention(q, keys, values)
        mask = window_mask(self._arange[start:end], self._arange[lo:end], sliding_window)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.shape[1] != keys.shape[1])

    def reset(self) -> None:
        self.length = self._start = 0
