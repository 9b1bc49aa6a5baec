"""Attention over a paged KV cache for a flat batch of sequences (the serving engine's model step).

Keys and values live in one tensor per layer, (kv_heads, num_blocks * block_size, head_dim): slot
`block * block_size + offset` holds one position of one sequence. Heads outermost makes a gathered
context (index_select along the slot dimension) contiguous per head, the layout attention reads
fastest, and lets the model's (1, kv_heads, tokens, head_dim) keys be written without a transpose. A step runs the model once on all
new tokens of all scheduled sequences, concatenated into a batch of one: decodes first (one token
each), then prefill chunks. `PagedBatch` implements the model's AttentionCache protocol for that
step. Everything that depends only on the step's layout (slots to write, slots to gather, masks) is
built once in `PagedBatch.__init__` and reused by every layer, so a layer costs two index_copy_,
one index_select per key/value and one scaled-dot-product-attention call for all decodes together. A step of decodes
only, in bf16 on a CPU with mlc's native kernels, goes further: `attend_projected` takes each layer's q/k/v projection
before RoPE and runs rotation, cache write and attention in one native call (decode_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mlc.kernels import decode_attention, native
from mlc.kernels.attention import window_mask


class PagedKVStore:
    """The physical KV cache: for each layer, keys and values of every slot of every block."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (kv_heads, num_blocks * block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers, keys and values."""
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class Segment:
    """The new tokens of one sequence in a step: cache entries start..start+length-1, over its block table.

    An entry's index is its token's position unless the sequence's cache has dropped entries (KV eviction,
    serve/kv_policy.py): then `position` is the RoPE position of the first new token, `start` where it goes.
    """

    start: int
    length: int
    blocks: list[int]
    position: int | None = None


def slot_table(tables: list[list[int]], length: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Slots of positions 0..length-1 for each block table, (len(tables), length); positions a table lacks map to slot 0.

    Built with tensor ops on the (few) block ids rather than a Python loop over (many) positions.
    """
    n = -(-length // block_size)
    table = torch.tensor([t[:n] + [0] * (n - len(t[:n])) for t in tables], dtype=torch.long, device=device)
    j = torch.arange(length, device=device)
    return table[:, j // block_size] * block_size + j % block_size


class PagedBatch:
    """One model step over a flat batch: implements AttentionCache (`positions`, `attend`).

    Segments of length 1 at the front of the list are decodes and share one batched attention call;
    the rest are prefill chunks, each attending to its cached prefix plus itself causally.
    """

    def __init__(self, store: PagedKVStore, segments: list[Segment]):
        self.store = store
        bs = store.block_size
        device = store.k[0].device
        self.num_decodes = 0
        while self.num_decodes < len(segments) and segments[self.num_decodes].length == 1:
            self.num_decodes += 1
        pos: list[int] = []
        for s in segments:
            first = s.start if s.position is None else s.position
            pos.extend(range(first, first + s.length))
        self.position_ids = torch.tensor(pos, dtype=torch.long, device=device).unsqueeze(0)
        self.num_tokens = len(pos)
        # A new token's slot: its block's id times the block size, plus its offset in the block.
        slots = [s.blocks[p // bs] * bs + p % bs for s in segments for p in range(s.start, s.start + s.length)]
        self.write_slots = torch.tensor(slots, dtype=torch.long, device=device)
        # Decided here, on Python values (a compiled step guards on the bool): the fused path of attend_projected. Not
        # for subclasses that override attend (kv_policy's ScoredBatch reads q and k there).
        self.fused_decode = (0 < self.num_decodes == len(segments) and type(self).attend is PagedBatch.attend
                             and store.dtype == torch.bfloat16 and device.type == "cpu" and native.available())

        # Decodes: gather every key of every decoding sequence, padded to the longest, masked past each length.
        self._decode_masks: dict[int | None, torch.Tensor | None] = {}
        if self.num_decodes:
            decodes = segments[: self.num_decodes]
            lens = [s.start + 1 for s in decodes]
            self.decode_lens = torch.tensor(lens, device=device)
            self.decode_max = max(lens)
            # Python values, decided here: a compiled step then guards on this one bool, not on a list
            # whose length and contents change every step (each change would be a recompilation).
            self._equal_lens = min(lens) == self.decode_max
            self.decode_gather = slot_table([s.blocks for s in decodes], self.decode_max, bs, device).reshape(-1)

        # Prefill chunks: (first token in the flat batch, length, gather index or None when there is no past).
        self.prefills: list[tuple[int, int, int, torch.Tensor | None]] = []
        offset = self.num_decodes
        for s in segments[self.num_decodes :]:
            gather_idx = None
            if s.start > 0:
                gather_idx = slot_table([s.blocks], s.start + s.length, bs, device)[0]
            self.prefills.append((offset, s.length, s.start, gather_idx))
            offset += s.length

    def positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.position_ids

    def _decode_mask(self, window: int | None) -> torch.Tensor | None:
        """Additive (decodes, 1, 1, longest) mask: keys past each sequence's length (or outside its window) are -inf."""
        if window not in self._decode_masks:
            # Decided on Python values, not tensors, so that a compiled step does not break its graph here.
            if self._equal_lens and (window is None or self.decode_max <= window):
                mask = None  # every key is visible (always the case at batch size 1): no mask at all
            else:
                lens = self.decode_lens[:, None]
                j = torch.arange(self.decode_max, device=lens.device)[None, :]
                allowed = j < lens
                if window is not None:
                    allowed &= j > lens - 1 - window
                zero = torch.zeros((), dtype=self.store.dtype, device=lens.device)
                mask = torch.where(allowed, zero, float("-inf")).to(self.store.dtype)[:, None, None, :]
            self._decode_masks[window] = mask
        return self._decode_masks[window]

    def attend_projected(self, layer_idx: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_heads: int,
                         sliding_window: int | None = None) -> torch.Tensor | None:
        """attend's output, (1, tokens, q_heads * head_dim), from a layer's fused q/k/v projection (1, tokens, (q_heads
        + 2 kv_heads) * head_dim) before RoPE, with the step's cos and signed sin: a decode-only bf16 step in one native
        call. None where that does not apply; the caller then rotates q and k and calls attend."""
        if not self.fused_decode or qkv.dtype != torch.bfloat16 or cos.dtype != torch.bfloat16:
            return None
        kc, vc = self.store.k[layer_idx], self.store.v[layer_idx]
        hkv, _, d = kc.shape
        if qkv.shape[-1] != (q_heads + 2 * hkv) * d or not decode_attention.supported(d, hkv, q_heads) \
                or (torch.is_grad_enabled() and qkv.requires_grad):
            return None
        if not (qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()):
            return None
        return decode_attention.decode_attention(qkv, cos, sin, kc, vc, self.write_slots, self.decode_gather, self.decode_lens,
                                                 q_heads, sliding_window)

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None = None
    ) -> torch.Tensor:
        kc, vc = self.store.k[layer_idx], self.store.v[layer_idx]
        kc.index_copy_(1, self.write_slots, k[0].to(kc.dtype))
        vc.index_copy_(1, self.write_slots, v[0].to(vc.dtype))
        hq, hkv, d = q.shape[1], kc.shape[0], q.shape[3]
        outs = []
        if self.num_decodes:
            b, length = self.num_decodes, self.decode_max
            # GQA without repeating keys: the q heads that share a kv head become that head's "queries".
            qd = q[0, :, :b].transpose(0, 1).reshape(b, hkv, hq // hkv, d)
            keys = kc.index_select(1, self.decode_gather).view(hkv, b, length, d).transpose(0, 1)
            values = vc.index_select(1, self.decode_gather).view(hkv, b, length, d).transpose(0, 1)
            out = F.scaled_dot_product_attention(qd, keys, values, attn_mask=self._decode_mask(sliding_window))
            outs.append(out.reshape(b, hq, d).transpose(0, 1).unsqueeze(0))
        for first, n, start, gather_idx in self.prefills:
            qs = q[:, :, first : first + n]
            if gather_idx is None and (sliding_window is None or n <= sliding_window):
                out = F.scaled_dot_product_attention(
                    qs, k[:, :, first : first + n], v[:, :, first : first + n], is_causal=True, enable_gqa=hq != hkv
                )
            else:
                if gather_idx is None:
                    keys, values = k[:, :, first : first + n], v[:, :, first : first + n]
                else:
                    keys = kc.index_select(1, gather_idx).unsqueeze(0)
                    values = vc.index_select(1, gather_idx).unsqueeze(0)
                qpos = torch.arange(start, start + n, device=q.device)
                allowed = window_mask(qpos, torch.arange(keys.shape[2], device=q.device), sliding_window)
                out = F.scaled_dot_product_attention(qs, keys, values, attn_mask=allowed, enable_gqa=hq != hkv)
            outs.append(out)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
