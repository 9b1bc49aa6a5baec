"""Bit packing for quantised weights: compressed-tensors int32 words, nibble bytes, torch's CPU int4 tiles.

compressed-tensors (what vLLM and transformers load) stores a signed b-bit value v as the unsigned
v + 2^(b-1), element i of a row at bit i*b of the row's little-endian int32 words. mlc's own layout
for 4-bit code books stores two codes per byte, the even column in the low nibble.
"""

from __future__ import annotations

import functools
import sys

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
    if bits in (4, 8) and words.dtype == torch.int32 and sys.byteorder == "little":
        # The words' little-endian bytes are the fields in order (8 bits) or two per byte, low nibble first (4 bits):
        # one pass over bytes instead of int32 shifts per field.
        raw = words.contiguous().view(torch.uint8)
        if bits == 8:
            return (raw[..., :columns] ^ 0x80).view(torch.int8)  # u - 128 in two's complement
        return unpack_nibbles(raw)[..., :columns].view(torch.int8) - 8
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


def int4pack_from_words(words: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """torch's CPU int4 tiles straight from compressed-tensors 4-bit int32 words [N, K/8] (N % 64 == 0, K % 8 == 0).

    The same bytes as int4pack_cpu(unpack_int32(words, 4, k) + 8): both layouts hold the unsigned u = q + 8, so
    this only moves nibbles, with the native kernel (int4_repack.c) or, without it, a few passes over uint8
    tensors of the packed size; no int8 or int32 [N, K] values in between.
    """
    if n % TILE_N or k % 8 or tuple(words.shape) != (n, k // 8) or words.dtype != torch.int32:
        raise ValueError(f"int4 tiles need int32 words [N, K/8] with N % {TILE_N} == 0 and K % 8 == 0, not {tuple(words.shape)} for {n}x{k}")
    from mlc.kernels import native

    tiles = native.int4pack_from_words(words.contiguous(), n, k)
    if tiles is not None:
        return tiles
    if sys.byteorder != "little":
        return int4pack_cpu(unpack_int32(words, 4, k).to(torch.int32) + 8)
    # Bytes [N, K/2], column 2c in the low nibble of byte c; a tile's byte (kk, j) takes rows j and j + 32.
    raw = words.contiguous().view(torch.uint8).view(n // TILE_N, 2, TILE_N // 2, k // 2)
    lo, hi = raw[:, 0], raw[:, 1]
    even = (lo & 15) | (hi << 4)  # uint8 shifts drop the high nibble
    odd = (lo >> 4) | (hi & 0xF0)
    return torch.stack((even, odd), dim=-1).view(n // TILE_N, TILE_N // 2, k).transpose(1, 2).contiguous().view(n, k // 2)


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
