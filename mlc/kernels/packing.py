"""Bit packing for quantised weights: compressed-tensors int32 words, nibble bytes, torch's CPU int4 tiles.

compressed-tensors (what vLLM and transformers load) stores a signed b-bit value v as the unsigned
v + 2^(b-1), element i of a row at bit i*b of the row's little-endian int32 words. mlc's own layout
for 4-bit code books stores two codes per byte, the even column in the low nibble.
"""

from __future__ import annotations

import functools

import torch


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed b-bit integers [..., K] (any int dtype) into int32 words [..., K*b/32], compressed-tensors order."""
    if 32 % bits:
        raise ValueError(f"only bit widths that divide 32 pack without straddling words, not {bits}")
    per_word = 32 // bits
    unsigned = values.to(torch.int32) + (1 << (bits - 1))
    pad = -values.shape[-1] % per_word  # a ragged last word is padded with zero bits, as compressed-tensors does
    if pad:
        unsigned = torch.nn.functional.pad(unsigned, (0, pad))
    unsigned = unsigned.view(*values.shape[:-1], -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int32, device=values.device) * bits
    # The fields are disjoint, so a wrapping int32 sum is a bitwise or.
    return (unsigned << shifts).sum(-1, dtype=torch.int32)


def unpack_int32(words: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Signed int8 values [..., columns] from compressed-tensors int32 words (the inverse of pack_int32)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32, device=words.device) * bits
    fields = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    values = fields.reshape(*words.shape[:-1], -1)[..., :columns]
    return (values - (1 << (bits - 1))).to(torch.int8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes (0..15) per uint8, column 2j in the low nibble and 2j+1 in the high one."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., 2*C] from nibble bytes [..., C]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


# torch's CPU int4 kernel tiles the weight: for each block of 64 output rows and each column k,
# 32 bytes hold rows j (low nibble) and j+32 (high nibble). The layout is torch's private business,
# so it is checked once per process before mlc reads weights back out of it.
TILE_N = 64


def int4pack_cpu(q_unsigned: torch.Tensor) -> torch.Tensor:
    """torch's CPU int4 tiles from unsigned 4-bit values [N, K] (0..15)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_unsigned.to(torch.int32).contiguous(), 1)


def unpack_int4pack_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Unsigned 4-bit values [N, K] as uint8 from torch's CPU int4 tiles (N a multiple of 64)."""
    tiles = packed.view(n // TILE_N, k, TILE_N // 2)
    return torch.cat((tiles & 15, tiles >> 4), dim=2).transpose(1, 2).reshape(n, k)


@functools.lru_cache(maxsize=1)
def int4pack_layout_known() -> bool:
    """Whether this torch's CPU int4 tiles are the layout unpack_int4pack_cpu reads."""
    q = torch.arange(2 * TILE_N * 64, dtype=torch.int32).remainder(16).view(2 * TILE_N, 64)
    q = q.roll(shifts=1, dims=0) ^ (torch.arange(64) % 16)  # distinct per row and column
    q = q.remainder(16)
    try:
        return torch.equal(unpack_int4pack_cpu(int4pack_cpu(q), *q.shape).to(torch.int32), q)
    except RuntimeError:
        return False
