"""mlc's C kernels for bf16 decode steps (mlc/kernels/native.py) against torch, and their fallbacks."""

import os
import subprocess
import sys

import pytest
import torch

from mlc.kernels import native
from mlc.models.transformer import Linear, RMSNorm

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.unavailable_reason()}")


def _bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at each value's magnitude."""
    return torch.ldexp(torch.ones_like(t), torch.frexp(t.abs().clamp_min(1e-30))[1] - 8)


@needs_native
@pytest.mark.parametrize("n,k", [(960, 576), (576, 1536), (7, 33), (64, 31), (49152, 576), (3, 1)])
def test_gemv_matches_fp32_to_bf16_rounding(n, k):
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(k, generator=g).bfloat16()
    ref = w.float() @ x.float()
    got = native.gemv_bf16(w, x)
    assert got.dtype == torch.bfloat16 and got.shape == (n,)
    # fp32 accumulation in another order, then one rounding: within one bf16 ulp plus fp32 noise
    assert ((got.float() - ref).abs() <= _bf16_ulp(ref) + 1e-5 * k).all()


@needs_native
@pytest.mark.parametrize("rows,dim", [(1, 576), (5, 576), (3, 33), (64, 1000)])
def test_rms_norm_is_bit_identical_to_torch_in_transformers_order(rows, dim):
    g = torch.Generator().manual_seed(rows * dim)
    x = (torch.randn(rows, dim, generator=g) * 3).bfloat16()
    w = (torch.rand(dim, generator=g) + 0.5).bfloat16()
    ref = w * torch.nn.functional.rms_norm(x.float(), (dim,), None, 1e-5).to(torch.bfloat16)
    assert torch.equal(native.rms_norm_bf16(x, w, 1e-5), ref)


@needs_native
def test_modules_use_the_kernels_only_without_autograd():
    lin = Linear(576, 960, bias=True).to(torch.bfloat16)
    norm = RMSNorm(576, 1e-5).to(torch.bfloat16)
    x = torch.randn(1, 1, 576).bfloat16()
    with torch.no_grad():
        fast, fast_norm = lin(x), norm(x)
    ref = (x.float().reshape(-1) @ lin.weight.float().T + lin.bias.float()).view(1, 1, -1)
    assert fast.shape == (1, 1, 960)
    assert (fast.float() - ref).abs().max() <= 2 * _bf16_ulp(ref).max()
    # With autograd the torch path runs, and gradients flow as through any nn.Linear.
    xg = x.clone().requires_grad_(True)
    y = lin(norm(xg))
    y.float().sum().backward()
    assert xg.grad is not None and lin.weight.grad is not None
    assert torch.equal(norm(x.clone().requires_grad_(True)).detach(), fast_norm)


def test_disabled_kernels_fall_back_to_torch_with_a_reason():
    code = """
import torch
from mlc.kernels import native
from mlc.models.transformer import Linear
from mlc.kernels.paged_attention import PagedBatch, PagedKVStore, Segment
lin = Linear(64, 32).to(torch.bfloat16)
x = torch.randn(64).bfloat16()
with torch.no_grad():
    same = torch.equal(lin(x), torch.mv(lin.weight, x) + lin.bias)
fused = PagedBatch(PagedKVStore(1, 4, 16, 2, 64, torch.bfloat16), [Segment(3, 1, [0])]).fused_decode
print(native.available(), same, fused, native.unavailable_reason(), sep="|")
"""
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MLC_NATIVE_KERNELS": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False|True|False|disabled by MLC_NATIVE_KERNELS=0"


@needs_native
@pytest.mark.parametrize("rows,dim", [(1, 576), (3, 33)])
def test_add_rms_norm_is_the_sum_then_the_norm_bit_for_bit(rows, dim):
    g = torch.Generator().manual_seed(rows + dim)
    x, h = (torch.randn(2, rows, dim, generator=g) * 3).bfloat16()
    w = (torch.rand(dim, generator=g) + 0.5).bfloat16()
    total, y = native.add_rms_norm_bf16(x, h, w, 1e-5)
    assert torch.equal(total, x + h)
    assert torch.equal(y, w * torch.nn.functional.rms_norm((x + h).float(), (dim,), None, 1e-5).to(torch.bfloat16))


@needs_native
@pytest.mark.parametrize("rows,inter", [(1, 1536), (3, 40)])
def test_silu_mul_is_torchs_silu_times_up_within_a_rounding(rows, inter):
    gate_up = (torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(inter)) * 4).bfloat16()
    ref = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    got = native.silu_mul_bf16(gate_up)
    # e^x by another polynomial than torch's (Sleef): fp32 silu may differ in its last bits, and so round the other way.
    assert got.shape == ref.shape and ((got.float() - ref.float()).abs() <= 2 * _bf16_ulp(ref.float())).all()
    assert (got == ref).float().mean() >= 0.99
