"""Guards for the fast paths: mistakes here cost speed silently, never correctness."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from mlc.kernels import native
from mlc.models import KVCache, build_model, load_model, save_model

TINY = {
    "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": True,
}


def _ops(fn) -> dict[str, int]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


def test_last_position_logits_never_copy_the_output_head(tmp_path):
    # Loaded under inference mode, weights do not require grad; matmul on a strided 3-D slice would
    # then take the bmm path and copy the whole transposed head weight on every call.
    path = save_model(build_model(TINY), tmp_path / "m")
    with torch.inference_mode():
        model = load_model(path, dtype="bf16")
        ids = torch.randint(0, 512, (1, 16))
        ops = _ops(lambda: model(ids, logits_to_keep=1))
    assert ops.get("aten::bmm", 0) == 0
    assert ops["aten::mm"] == 2 * 7  # seven projections per layer over 16 rows
    # The head over the one kept row: a bf16 matrix-vector product (mlc's kernel where built), no copy.
    assert ops.get("aten::mv", 0) == (0 if native.available() else 1)
    assert ops.get("aten::clone", 0) == 0 and ops.get("aten::contiguous", 0) == 0


def test_one_half_precision_row_takes_the_matrix_vector_path_with_linears_result():
    from mlc.models.transformer import Linear

    torch.manual_seed(0)
    layer = Linear(96, 40, bias=True).to(torch.bfloat16)
    x = torch.randn(1, 1, 96, dtype=torch.bfloat16)
    ops = _ops(lambda: layer(x))
    assert ops.get("aten::mv", 0) == 1 and ops.get("aten::mm", 0) == 0 and ops.get("aten::addmm", 0) == 0
    expected = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert layer(x).shape == (1, 1, 40)
    torch.testing.assert_close(layer(x).float(), expected, atol=0.05, rtol=0.02)  # bf16 rounding of the output
    several_rows = torch.randn(3, 96, dtype=torch.bfloat16)
    assert _ops(lambda: layer(several_rows)).get("aten::mv", 0) == 0  # more than one row: F.linear as before
    torch.testing.assert_close(layer(several_rows[:1])[0], layer(several_rows)[0], atol=0.05, rtol=0.02)


def test_decoding_writes_into_the_preallocated_cache(tmp_path):
    model = build_model(TINY)
    cache = KVCache(model.config, batch_size=1, max_length=32)
    storage = [t.data_ptr() for t in cache.k + cache.v]
    with torch.inference_mode():
        model(torch.randint(0, 512, (1, 8)), cache=cache)
        for _ in range(4):
            model(torch.randint(0, 512, (1, 1)), cache=cache, logits_to_keep=1)
    assert cache.length == 12
    assert [t.data_ptr() for t in cache.k + cache.v] == storage
    assert cache.k[0][:, :, 12:].abs().sum() == 0 and cache.k[0][:, :, :12].abs().sum() > 0


def test_fused_projections_give_the_same_logits_with_four_matmuls_per_layer():
    from mlc.models.transformer import fuse_projections

    config = {**TINY, "model_type": "qwen2", "tie_word_embeddings": False}  # Qwen2: q/k/v carry biases
    model = build_model(config).eval()
    ids = torch.randint(0, 512, (2, 16))
    with torch.inference_mode():
        before = model(ids).logits
        assert fuse_projections(model) == 2 * 2  # one attention and one MLP per layer
        after = model(ids).logits
        ops = _ops(lambda: model(ids, logits_to_keep=1))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert ops["aten::addmm"] + ops.get("aten::mm", 0) == 2 * 4 + 1  # qkv, o, gate_up, down per layer; the head
