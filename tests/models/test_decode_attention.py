"""The fused decode attention (RoPE, cache write, attention over the paged store in one call) against the torch path."""

from __future__ import annotations

import math

import pytest
import torch

from mlc.kernels import native
from mlc.kernels.decode_attention import decode_attention_torch
from mlc.kernels.paged_attention import PagedBatch, PagedKVStore, Segment, slot_table
from mlc.models.config import config_from_hf
from mlc.models.rope import RotaryTable, apply_rope

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.unavailable_reason()}")

HQ, HKV, D, BS = 9, 3, 64, 16  # SmolLM2's heads
# Decoding sequences: (past length, scattered blocks); lengths across chunk and block boundaries, one of a single token.
SEQS = [(40, [7, 3, 12]), (0, [5]), (130, [20, 1, 30, 2, 9, 14, 22, 25, 31]), (16, [4, 11])]


def _rope() -> RotaryTable:
    return RotaryTable(config_from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": HQ * D, "intermediate_size": 8,
                                       "num_hidden_layers": 1, "num_attention_heads": HQ, "num_key_value_heads": HKV,
                                       "max_position_embeddings": 256}))


def _step(seed: int):
    """A store whose sequences' past keys and values are random, and one decode step's inputs over it."""
    g = torch.Generator().manual_seed(seed)
    store = PagedKVStore(1, num_blocks=32, block_size=BS, kv_heads=HKV, head_dim=D, dtype=torch.bfloat16)
    store.k[0].copy_(torch.randn(store.k[0].shape, generator=g))
    store.v[0].copy_(torch.randn(store.v[0].shape, generator=g))
    qkv = torch.randn(1, len(SEQS), (HQ + 2 * HKV) * D, generator=g).bfloat16()
    batch = PagedBatch(store, [Segment(p, 1, blocks) for p, blocks in SEQS])
    cos, sin = _rope().cos_sin(batch.position_ids, torch.bfloat16)
    return store, batch, qkv, cos, sin


def _torch_path(store: PagedKVStore, batch: PagedBatch, qkv, cos, sin, window):
    """What the model did before: rotate q and k with apply_rope, then PagedBatch.attend (its torch ops)."""
    b = qkv.shape[1]
    heads = qkv.view(1, b, HQ + 2 * HKV, D).transpose(1, 2)
    q, k = apply_rope(heads[:, : HQ + HKV], cos, sin).split([HQ, HKV], dim=1)
    out = PagedBatch.attend(batch, 0, q, k, heads[:, HQ + HKV :], sliding_window=window)
    return out.transpose(1, 2).reshape(1, b, -1)


def _exact(store: PagedKVStore, qkv, cos, sin, window):
    """fp32 attention of the rotated bf16 q over the stored bf16 keys and values, one sequence and head at a time."""
    heads = qkv.view(len(SEQS), HQ + 2 * HKV, D)
    q = apply_rope(heads[:, None, :HQ], cos.view(-1, 1, 1, D), sin.view(-1, 1, 1, D))[:, 0].float()
    rows = []
    for i, (past, blocks) in enumerate(SEQS):
        n = past + 1
        slots = slot_table([blocks], n, BS)[0][max(0, n - window) if window else 0 :]
        k, v = store.k[0][:, slots].float(), store.v[0][:, slots].float()
        group = q[i].view(HKV, HQ // HKV, D)
        p = torch.softmax(group @ k.transpose(-1, -2) / math.sqrt(D), dim=-1)
        rows.append((p @ v).reshape(-1))
    return torch.stack(rows)[None]


@needs_native
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("threads", [1, 2])  # one thread once skipped the rotation and the cache write
def test_native_decode_attention_matches_the_torch_path_and_exact_attention(window, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    store, batch, qkv, cos, sin = _step(1)
    assert batch.fused_decode
    ref_store, ref_batch, _, _, _ = _step(1)
    fused = batch.attend_projected(0, qkv, cos, sin, HQ, sliding_window=window)
    ref = _torch_path(ref_store, ref_batch, qkv, cos, sin, window)
    # The new keys (rotated) and values are written to their slots with the torch path's exact bits, nothing else moves.
    assert torch.equal(store.k[0], ref_store.k[0]) and torch.equal(store.v[0], ref_store.v[0])
    assert fused.shape == ref.shape == (1, len(SEQS), HQ * D) and fused.dtype == torch.bfloat16
    exact = _exact(store, qkv, cos, sin, window)
    # fp32 probabilities and sums, rounded once: within a bf16 rounding of exact attention, as close as torch's path.
    assert (fused.float() - exact).abs().max() <= 2**-8 * exact.abs().max()
    assert (fused.float() - exact).abs().mean() <= (ref.float() - exact).abs().mean() * 1.05
    assert (fused.float() - ref.float()).abs().max() <= 2**-7 * exact.abs().max()


def test_torch_fallback_matches_the_torch_path():
    store, batch, qkv, cos, sin = _step(2)
    ref_store, ref_batch, _, _, _ = _step(2)
    out = decode_attention_torch(qkv, cos, sin, store.k[0], store.v[0], batch.write_slots, batch.decode_gather,
                                 batch.decode_lens, HQ, 24)
    ref = _torch_path(ref_store, ref_batch, qkv, cos, sin, 24)
    assert torch.equal(store.k[0], ref_store.k[0]) and torch.equal(store.v[0], ref_store.v[0])
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@needs_native
def test_the_operator_runs_the_kernel_and_checks_out():
    store, batch, qkv, cos, sin = _step(3)
    ref_store, ref_batch, _, _, _ = _step(3)
    args = (qkv, cos, sin, store.k[0], store.v[0], batch.write_slots, batch.decode_gather, batch.decode_lens, HQ, None)
    out = torch.ops.mlc.decode_attention_bf16(*args)
    assert torch.equal(out, ref_batch.attend_projected(0, qkv, cos, sin, HQ))
    assert torch.equal(store.k[0], ref_store.k[0])
    torch.library.opcheck(torch.ops.mlc.decode_attention_bf16, args, test_utils=("test_schema", "test_faketensor"))


def test_steps_that_are_not_all_decodes_or_not_bf16_take_the_torch_path():
    store = PagedKVStore(1, num_blocks=8, block_size=BS, kv_heads=HKV, head_dim=D, dtype=torch.bfloat16)
    mixed = PagedBatch(store, [Segment(4, 1, [0]), Segment(0, 5, [1])])
    assert not mixed.fused_decode
    assert mixed.attend_projected(0, torch.zeros(1, 6, (HQ + 2 * HKV) * D).bfloat16(), *[torch.zeros(1, 1, 6, D).bfloat16()] * 2, HQ) is None
    fp32 = PagedKVStore(1, num_blocks=8, block_size=BS, kv_heads=HKV, head_dim=D, dtype=torch.float32)
    assert not PagedBatch(fp32, [Segment(4, 1, [0])]).fused_decode


@needs_native
def test_a_bf16_model_decoding_through_the_fused_kernels_gives_transformers_logits(tiny_hf_model, monkeypatch):
    from transformers import AutoModelForCausalLM

    from mlc.models import load_model
    from mlc.models.transformer import fuse_projections

    # GQA (4 q heads, 2 kv heads) of head_dim 32, a sliding window of 8 that the decoded positions pass.
    path = tiny_hf_model("mistral", hidden_size=128)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    calls = []
    kernel = native.decode_attention_bf16
    monkeypatch.setattr(native, "decode_attention_bf16", lambda *a: calls.append(1) or kernel(*a))
    with torch.inference_mode():
        expected = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()(ids).logits.float()
        model = load_model(path, dtype="bf16")
        fuse_projections(model)
        cfg = model.config
        store = PagedKVStore(cfg.num_hidden_layers, num_blocks=16, block_size=4, kv_heads=2, head_dim=32, dtype=torch.bfloat16)
        blocks = [[3, 9, 0, 14, 6], [1, 12, 7, 4, 10]]  # scattered, 20 positions each
        # Prompts of different lengths (12 and 7 tokens), then decode steps where both sequences decode together.
        model(ids[:1, :12].reshape(1, -1), cache=PagedBatch(store, [Segment(0, 12, blocks[0])]))
        model(ids[1:, :7].reshape(1, -1), cache=PagedBatch(store, [Segment(0, 7, blocks[1])]))
        got, unfused = [], []
        for step in range(8):
            a, b = 12 + step, 7 + step
            tokens = torch.stack([ids[0, a], ids[1, b]]).view(1, 2)
            batch = PagedBatch(store, [Segment(a, 1, blocks[0]), Segment(b, 1, blocks[1])])
            assert batch.fused_decode
            got.append(model(tokens, cache=batch).logits.float()[0])
            # The same step through the torch path (it writes the same keys into the same slots).
            batch = PagedBatch(store, [Segment(a, 1, blocks[0]), Segment(b, 1, blocks[1])])
            batch.fused_decode = False
            unfused.append(model(tokens, cache=batch).logits.float()[0])
    assert len(calls) == 8 * cfg.num_hidden_layers
    got, unfused = torch.stack(got), torch.stack(unfused)
    want = torch.stack([torch.stack([expected[0, 12 + s], expected[1, 7 + s]]) for s in range(8)])
    assert (got - want).abs().max().item() <= 0.03
    assert (got - unfused).abs().max().item() <= 0.03
