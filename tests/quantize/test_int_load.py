"""Loading integer-quantised weights lays them out for the kernels straight from the stored words, bit-exactly.

The reference is the layout built from compressed-tensors' own unpacker (the [N, K] values, then torch's int4
packer): the tiles and the kernel's scales must be byte-identical, the stacked q/k/v and gate/up too, and the
model's logits equal.
"""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

from mlc.kernels import native, packing
from mlc.kernels.quant_linear import IntLinear
from mlc.kernels.quant_weights import IntWeight

SETTINGS = {"int4": ("int4", {"group_size": 32}), "int4-asym": ("int4", {"group_size": 64, "asymmetric": True}), "int8": ("int8", {})}


@pytest.mark.parametrize("shape", [(64, 32), (192, 576), (128, 1536)])
@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_int4_tiles_from_words_equal_torch_packer(shape, kernel, monkeypatch):
    n, k = shape
    q = torch.randint(-8, 8, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(n + k))
    words = packing.pack_int32(q, 4)
    if kernel == "torch":
        monkeypatch.setattr(native, "int4pack_from_words", lambda *a: None)
    elif native.int4pack_from_words(words, n, k) is None:
        pytest.skip("no C compiler: the native repack is not built")
    assert torch.equal(packing.int4pack_from_words(words, n, k), packing.int4pack_cpu(q.to(torch.int32) + 8))
    with pytest.raises(ValueError, match="N % 64"):
        packing.int4pack_from_words(words[:32], 32, k)


@pytest.fixture(scope="module")
def int_dirs(small_model_dir, tmp_path_factory):
    from mlc import plugins
    from mlc.commands.quantize.quantize import QuantizeRequest, quantize_model
    from mlc.contracts import SchemeOptions

    out = {}
    for name, (scheme_name, opts) in SETTINGS.items():
        scheme = plugins.load_one("quant_schemes", scheme_name)
        out[name] = tmp_path_factory.mktemp("int-load") / name
        out[name].mkdir()
        quantize_model(QuantizeRequest(small_model_dir, scheme, scheme.options(SchemeOptions(**opts))), out[name])
    return out


def _reference_modules(path, name):
    """Each quantised Linear built from the values compressed-tensors' unpacker reads (the unpack-then-pack path)."""
    from mlc.io.safetensors_reader import ModelTensors

    bits, group = (8, None) if name == "int8" else (4, SETTINGS[name][1]["group_size"])
    modules = {}
    with ModelTensors(path) as t:
        for packed in [n for n in t.names() if n.endswith(".weight_packed")]:
            layer = packed.removesuffix(".weight_packed")
            shape = torch.Size(t.read(f"{layer}.weight_shape").tolist())
            q = unpack_from_int32(t.read(packed), bits, shape).to(torch.int8)
            scale, zero = t.read(f"{layer}.weight_scale"), None
            if f"{layer}.weight_zero_point" in t:
                zero = unpack_from_int32(t.read(f"{layer}.weight_zero_point"), bits, scale.shape, packed_dim=0).to(torch.int8)
            modules[layer] = IntLinear(IntWeight(q, scale, zero, bits, group))
            if bits == 4:  # the kernel's scales and zeros as the int4 path has always built them
                s32 = scale.to(torch.float32)
                pairs = torch.stack((s32, torch.zeros_like(s32) if zero is None else -zero.to(torch.float32) * s32), dim=-1)
                assert torch.equal(modules[layer]._scales_and_zeros.view(torch.int16),
                                   pairs.transpose(0, 1).contiguous().to(torch.bfloat16).view(torch.int16))
    return modules


def _layout(m):
    return (m._tiles, m._scales_and_zeros.view(torch.int16)) if m.path == "int4pack" else (m.q, m.scale)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_loaded_int_model_equals_the_unpacked_path(int_dirs, name):
    from mlc.models import load_model
    from mlc.models.quant_load import quant_modules, set_module
    from mlc.models.transformer import fuse_projections

    model = load_model(int_dirs[name], dtype="bfloat16")
    reference = load_model(int_dirs[name], dtype="bfloat16")
    expected = _reference_modules(int_dirs[name], name)
    loaded = quant_modules(model)
    assert sorted(loaded) == sorted(expected)
    for layer, module in loaded.items():
        assert module.path == expected[layer].path == ("int8pack" if name == "int8" else "int4pack")
        assert all(torch.equal(a, b) for a, b in zip(_layout(module), _layout(expected[layer]), strict=True)), layer
        set_module(reference, layer, expected[layer])
    assert fuse_projections(model) == fuse_projections(reference) == 2 * model.config.num_hidden_layers
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)
    # Stacked from the parts' tiles: the same bytes as packing the stacked values afresh.
    mlp = model.model.layers[0].mlp.gate_up_proj
    parts = [expected["model.layers.0.mlp.gate_proj"], expected["model.layers.0.mlp.up_proj"]]
    afresh = IntLinear(IntWeight(torch.cat([p.quant_weight().q for p in parts]), torch.cat([p.scale for p in parts]),
                                 None if parts[0].zero_point is None else torch.cat([p.zero_point for p in parts]),
                                 parts[0].bits, parts[0].group_size))
    assert all(torch.equal(a, b) for a, b in zip(_layout(mlp), _layout(afresh), strict=True))


def test_a_move_that_moves_nothing_keeps_the_layout(int_dirs):
    from mlc.models import load_model

    module = load_model(int_dirs["int4"], dtype="bfloat16").model.layers[0].self_attn.q_proj
    tiles = module._tiles
    assert module.to("cpu")._tiles is tiles
    assert module.to(torch.float16).scale.dtype == torch.float16  # a real change re-lays the weight, exactly
    assert module._tiles is not tiles and torch.equal(module._tiles, tiles)
