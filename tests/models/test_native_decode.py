"""An int4 decoder layer of a decode step in one native call gives the module path's bits (models/native_decode.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from mlc.kernels import native
from mlc.kernels.paged_attention import PagedBatch, PagedKVStore, Segment
from mlc.kernels.quant_linear import quant_linear
from mlc.kernels.quant_weights import IntWeight
from mlc.models import build_model, native_decode
from mlc.models.transformer import fuse_projections

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.unavailable_reason()}")

CONFIG = {"model_type": "mistral", "vocab_size": 128, "hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "sliding_window": 6}


def _int4(linear: torch.nn.Linear, asymmetric: bool, g: torch.Generator):
    n, k = linear.weight.shape
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, k // 32, generator=g) * 0.05 + 0.01).bfloat16()
    zero = torch.randint(-2, 3, (n, k // 32), dtype=torch.int8, generator=g) if asymmetric else None
    return quant_linear(IntWeight(q, scale, zero, 4, 32))


@pytest.fixture(scope="module")
def int4_model():
    g = torch.Generator().manual_seed(0)
    model = build_model(CONFIG).to(torch.bfloat16).eval()
    for i, layer in enumerate(model.model.layers):  # layer 1 has zero points: the kernel's group sums
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(parent, name, _int4(getattr(parent, name), i == 1, g))
    assert fuse_projections(model) == 4
    return model


def _decode(model, monkeypatch, native_layers: bool) -> tuple[torch.Tensor, PagedKVStore]:
    """Logits of 6 decode steps of two sequences (prompts of 9 and 3 tokens) together, and the store after them."""
    store = PagedKVStore(2, num_blocks=12, block_size=4, kv_heads=2, head_dim=32, dtype=torch.bfloat16)
    blocks = [[5, 0, 9, 2], [7, 11, 3]]
    ids = torch.randint(0, 128, (2, 15), generator=torch.Generator().manual_seed(1))
    logits = []
    with monkeypatch.context() as m, torch.inference_mode():
        if not native_layers:
            m.setattr(native_decode, "decode_layer", lambda *a: None)
        model(ids[:1, :9], cache=PagedBatch(store, [Segment(0, 9, blocks[0])]))
        model(ids[1:, :3], cache=PagedBatch(store, [Segment(0, 3, blocks[1])]))
        for s in range(6):
            tokens = torch.stack([ids[0, 9 + s], ids[1, 3 + s]]).view(1, 2)
            logits.append(model(tokens, cache=PagedBatch(store, [Segment(9 + s, 1, blocks[0]), Segment(3 + s, 1, blocks[1])])).logits)
    return torch.cat(logits), store


@needs_native
def test_one_native_call_per_int4_layer_gives_the_modules_bits(int4_model, monkeypatch):
    calls = []
    kernel = native.decode_layer_int4
    monkeypatch.setattr(native, "decode_layer_int4", lambda *a: calls.append(1) or kernel(*a))
    fast, fast_store = _decode(int4_model, monkeypatch, native_layers=True)
    assert len(calls) == 6 * 2
    modules, module_store = _decode(int4_model, monkeypatch, native_layers=False)
    assert torch.equal(fast, modules)
    assert all(torch.equal(a, b) for a, b in zip(fast_store.k + fast_store.v, module_store.k + module_store.v))
    assert fast.abs().max() > 0


@needs_native
def test_the_layer_kernel_follows_swapped_modules_and_steps_aside_for_hooks(int4_model, monkeypatch):
    model = copy.deepcopy(int4_model)
    _decode(model, monkeypatch, native_layers=True)  # each layer's arguments are worked out and kept
    mlp = model.model.layers[0].mlp
    mlp.down_proj = _int4(torch.nn.Linear(128, 128), False, torch.Generator().manual_seed(5))  # stale addresses would read the old one
    model.model.layers[1].input_layernorm.register_forward_hook(lambda *a: None)  # a hook must see the module run
    calls = []
    kernel = native.decode_layer_int4
    monkeypatch.setattr(native, "decode_layer_int4", lambda *a: calls.append(1) or kernel(*a))
    fast, _ = _decode(model, monkeypatch, native_layers=True)
    assert len(calls) == 6  # layer 0 only
    modules, _ = _decode(model, monkeypatch, native_layers=False)
    assert torch.equal(fast, modules)


@needs_native
def test_the_layer_kernel_follows_tensors_replaced_inside_the_same_modules(int4_model, monkeypatch):
    model = copy.deepcopy(int4_model)
    _decode(model, monkeypatch, native_layers=True)
    down = model.model.layers[0].mlp.down_proj
    down._tiles = down._tiles.clone()  # what a device move or cast does: same module, new tensor of the same shape
    fast, _ = _decode(model, monkeypatch, native_layers=True)
    modules, _ = _decode(model, monkeypatch, native_layers=False)
    assert torch.equal(fast, modules)


@needs_native
def test_compile_leaves_the_steps_the_layer_kernel_runs_eager(int4_model):
    from mlc.commands.serve import compiling

    kinds = compiling.kinds_for(32)
    assert native_decode.runs_every_layer(int4_model)
    assert compiling.eager_kinds(int4_model, kinds) == ["single", "ragged", "equal"]  # 16 rows: the compiled graph
    model = copy.deepcopy(int4_model)
    model.model.layers[1].mlp.down_proj = torch.nn.Linear(128, 128).bfloat16()  # one layer the kernel cannot run
    assert not native_decode.runs_every_layer(model) and compiling.eager_kinds(model, kinds) == []
