"""Attention of a paged step's decode rows straight from their fused q/k/v projection: RoPE, the cache write, attention.

A decode step of a small model on a CPU spends more time in the small ops around attention than in attention: per
layer the torch path rotates q and k (four bf16 ops), writes k and v into their slots (two index_copy_), gathers each
sequence's keys and values through its slot table (two index_select copies), calls scaled-dot-product attention and
transposes around it. decode_attention.c does all of it in one call for the decode rows of a PagedBatch (GQA,
per-sequence lengths, sliding windows; fp32 softmax and sums; bf16 in and out), reading keys and values in place.

`decode_attention` runs the native kernel; in a graph being compiled it is the torch operator
mlc::decode_attention_bf16 (the kernel at run time, `decode_attention_torch` where it is missing), so compiled decode
steps can keep it. `decode_attention_torch` computes the same in torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlc.kernels import native

MAX_GROUP = 16  # q heads per kv head the kernel takes (MAX_REP in decode_attention.c)
MAX_HEAD_DIM = 256  # MAX_DIM in decode_attention.c


def supported(head_dim: int, kv_heads: int, q_heads: int) -> bool:
    """Whether the native kernel takes these head shapes (head_dim a multiple of 32 up to 256, at most 16 q heads per kv head)."""
    return head_dim % 32 == 0 and head_dim <= MAX_HEAD_DIM and q_heads % kv_heads == 0 and q_heads // kv_heads <= MAX_GROUP


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     write_slots: torch.Tensor, slot_table: torch.Tensor, lens: torch.Tensor, q_heads: int,
                     window: int | None) -> torch.Tensor:
    """Attention output (1, b, q_heads * head_dim) of b decode rows, each one new token of its own sequence.

    qkv: (1, b, (q_heads + 2 kv_heads) * head_dim), the rows' q, k and v heads before RoPE; cos, sin: (1, 1, b, head_dim),
    the rows' cos and signed sin (models/rope.py); k_cache, v_cache: one layer's (kv_heads, slots, head_dim) store, into
    which row i's rotated k and its v are written at slot write_slots[i]; slot_table: (b * longest,) int64, the slots of
    positions 0..longest-1 of each row's sequence; lens: (b,) int64, each sequence's length with its new token; window:
    a sliding window (keys within the last `window` positions) or None. All bf16 (int64 for indices), contiguous, CPU.
    """
    args = (qkv, cos, sin, k_cache, v_cache, write_slots, slot_table, lens, q_heads, window)
    if torch.compiler.is_compiling():
        return torch.ops.mlc.decode_attention_bf16(*args)
    out = native.decode_attention_bf16(*args)
    return out if out is not None else decode_attention_torch(*args)


def decode_attention_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, write_slots: torch.Tensor, slot_table: torch.Tensor, lens: torch.Tensor,
                           q_heads: int, window: int | None) -> torch.Tensor:
    """decode_attention in torch ops (where the native kernel is missing)."""
    hkv, _, d = k_cache.shape
    b = lens.shape[0]
    length = slot_table.numel() // b
    heads = qkv.view(b, q_heads + 2 * hkv, d)
    qk = heads[:, : q_heads + hkv]
    qk = qk * cos.view(b, 1, d) + torch.roll(qk, d // 2, dims=-1) * sin.view(b, 1, d)  # models/rope.py's apply_rope
    q, k = qk.split([q_heads, hkv], dim=1)
    k_cache.index_copy_(1, write_slots, k.transpose(0, 1))
    v_cache.index_copy_(1, write_slots, heads[:, q_heads + hkv :].transpose(0, 1))
    keys = k_cache.index_select(1, slot_table).view(hkv, b, length, d).transpose(0, 1)
    values = v_cache.index_select(1, slot_table).view(hkv, b, length, d).transpose(0, 1)
    j = torch.arange(length, device=lens.device)[None, :]
    allowed = j < lens[:, None]
    if window is not None:
        allowed &= j >= lens[:, None] - window
    # GQA without repeating keys: the q heads that share a kv head are that head's "queries".
    out = F.scaled_dot_product_attention(q.reshape(b, hkv, q_heads // hkv, d), keys, values, attn_mask=allowed[:, None, None, :])
    return out.reshape(1, b, q_heads * d)


# The torch operator, for graphs torch.compile builds (see native.py): it writes k_cache and v_cache in place.
_ops = torch.library.Library("mlc", "FRAGMENT")
_ops.define("decode_attention_bf16(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
            "Tensor write_slots, Tensor slot_table, Tensor lens, int q_heads, int? window) -> Tensor")


def _decode_attention_op(*args) -> torch.Tensor:  # decode_attention's arguments
    out = native.decode_attention_bf16(*args)
    return out if out is not None else decode_attention_torch(*args)


_ops.impl("decode_attention_bf16", _decode_attention_op, "CPU")


@torch.library.register_fake("mlc::decode_attention_bf16", lib=_ops)
def _(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
      write_slots: torch.Tensor, slot_table: torch.Tensor, lens: torch.Tensor, q_heads: int, window: int | None) -> torch.Tensor:
    return qkv.new_empty(1, lens.shape[0], q_heads * k_cache.shape[2])
