"""Bit packing matches compressed-tensors' own packer (the layout vLLM and transformers read)."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from mlc.kernels import packing


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(16, 64), (5, 36), (192, 576)])
def test_pack_int32_is_byte_identical_to_compressed_tensors(bits, shape):
    torch.manual_seed(bits)
    values = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, dtype=torch.int8)
    assert torch.equal(packing.pack_int32(values, bits), pack_to_int32(values, bits))
    # zero points are packed along the output dimension
    assert torch.equal(packing.pack_int32(values.T, bits).T, pack_to_int32(values, bits, packed_dim=0))
    assert torch.equal(packing.unpack_int32(packing.pack_int32(values, bits), bits, shape[1]), values)


def test_nibbles_put_the_even_column_in_the_low_nibble():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert packing.pack_nibbles(codes).tolist() == [[1 | 2 << 4, 15]]
    assert torch.equal(packing.unpack_nibbles(packing.pack_nibbles(codes)), codes)


def test_torch_cpu_int4_tiles_are_read_back_exactly():
    assert packing.int4pack_layout_known()
    q = torch.randint(0, 16, (192, 576), dtype=torch.int32)
    assert torch.equal(packing.unpack_int4pack_cpu(packing.int4pack_cpu(q), 192, 576).int(), q)
