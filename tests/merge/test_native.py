"""sortselect.c against torch: the magnitude selections pick exactly the entries torch's (unstable) CPU sort
picks, as mergekit's TIES and Breadcrumbs do, and the one-pass combine gives the bits of the torch operations."""

from __future__ import annotations

import pytest
import torch

from mlc.commands.merge import native, sparsify


def torch_keep(delta: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    order = torch.sort(delta.reshape(-1).abs().float(), descending=descending).indices[start:stop]
    keep = torch.zeros(delta.numel(), dtype=torch.uint8)
    keep[order] = 1
    return keep


def cases(seed: int, count: int):
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        n = int(torch.randint(1, 6000, (1,), generator=g))
        kind = i % 5
        if kind == 0:  # a handful of distinct values: every boundary falls inside a run of ties
            x = torch.randint(-4, 5, (n,), generator=g).float()
        elif kind == 1:  # deltas between bf16 weights, in bf16
            x = ((torch.randn(n, generator=g) * 0.02).bfloat16() - (torch.randn(n, generator=g) * 0.02).bfloat16())
        elif kind == 2:  # the same in float32 compute
            x = (torch.randn(n, generator=g) * 0.02).bfloat16().float() - (torch.randn(n, generator=g) * 0.02).bfloat16().float()
        elif kind == 3:
            x = torch.randn(n, generator=g, dtype=torch.float64)
        else:
            x = torch.randint(0, 300, (n,), generator=g).half()
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        lo = int(torch.randint(0, k + 1, (1,), generator=g))
        yield x, lo, k


def test_the_kernel_builds_here():
    assert native.library() is not None, native.unavailable_reason()


@pytest.mark.parametrize("descending", [True, False])
def test_selection_matches_torch_sort_on_every_boundary(descending):
    for x, lo, k in cases(int(descending), 150):
        start = 0 if descending else lo
        got = sparsify.sorted_range_keep(x, start, k, descending).clone()
        assert torch.equal(got, torch_keep(x, start, k, descending)), (x.dtype, x.numel(), start, k)


def test_selection_matches_on_a_large_bf16_delta_and_falls_back_on_nan():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(300_000, generator=g) * 0.01).bfloat16() - (torch.randn(300_000, generator=g) * 0.01).bfloat16()
    assert torch.equal(sparsify.sorted_range_keep(x, 0, 150_000, True).clone(), torch_keep(x, 0, 150_000, True))
    x[7] = float("nan")
    assert torch.equal(sparsify.sorted_range_keep(x, 0, 1000, True).clone(), torch_keep(x, 0, 1000, True))


def test_without_the_kernel_torch_sorts(monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    x = torch.randint(-3, 4, (2000,)).float()
    assert torch.equal(sparsify.sorted_range_keep(x, 0, 700, True), torch_keep(x, 0, 700, True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("consensus", [True, False])
def test_the_one_pass_combine_gives_the_bits_of_torchs_operations(dtype, consensus, monkeypatch):
    from mlc.commands.merge.methods.task_arithmetic import combine_

    g = torch.Generator().manual_seed(int(consensus))
    n = 70_001
    base = torch.randn(n, generator=g).to(dtype)
    base[:50] = -0.0  # with no agreeing entry the sum is +0, so -0 + +0 stays +0
    deltas = [(torch.randint(-3, 4, (n,), generator=g) * 2**-7).to(dtype) for _ in range(3)]
    for d in deltas:
        d[:50] = 0
    deltas[2][60_000] = float("nan")  # torch finishes the tensor from the chunk holding the NaN
    for params in ({"weight": [0.3, -0.5, 0.7], "normalize": True, "lambda": 1.0}, {"weight": [1.0, 0.5, 0.25], "normalize": False, "lambda": 0.8}):
        native_out = combine_([d.clone() for d in deltas], base.clone(), params, consensus)
        with monkeypatch.context() as m:
            m.setattr(native, "library", lambda: None)
            torch_out = combine_([d.clone() for d in deltas], base.clone(), params, consensus)
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert torch.equal(native_out.view(bits), torch_out.view(bits))
        assert not bool(torch.signbit(native_out[:50]).any())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])  # float16: torch's path
def test_the_linear_kernel_gives_the_bits_of_mergekits_torch_operations(dtype):
    from mlc.commands.merge.methods.linear import SPLIT, linear

    g = torch.Generator().manual_seed(7)
    n = 2 * SPLIT + 4_099  # two threads' shares and a tail
    xs = [(torch.randn(n, generator=g) * 0.02).to(dtype) for _ in range(3)]
    for x in xs:
        x[:64] = -0.0  # a sum from +0 of -0 products is +0
    xs[0][64:96] = 1e-39  # subnormal
    xs[2][100] = float("inf")
    xs[1][SPLIT + 5_000] = float("nan")  # torch finishes the second thread's share from the NaN's chunk
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for weight, normalize in (([0.5, 0.3, 0.2], True), ([1.0, -0.7, 0.25], False)):
            w = torch.tensor(weight)  # mergekit's linear: float32 accumulator, addcmul_ per model, div_, cast back
            expected = torch.zeros(n)
            for x, c in zip(xs, w):
                expected.addcmul_(x, c)
            if normalize:
                expected.div_(w.sum())
            got = linear([x.clone() for x in xs], None, {"weight": weight, "normalize": normalize})
            bits = torch.int32 if dtype == torch.float32 else torch.int16
            assert got.dtype == dtype and torch.equal(got.view(bits), expected.to(dtype).view(bits))
    finally:
        torch.set_num_threads(threads)
