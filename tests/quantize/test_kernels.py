"""Every kernel path of the quantised Linear modules against dequantise-then-matmul in fp32."""

import pytest
import torch

from mlc.kernels import quant_linear as ql
from mlc.kernels.quant_weights import NF4_CODEBOOK, CodebookWeight, Fp8Weight, IntWeight, OutlierInt8Weight

N, K = 192, 256


def _int4(symmetric: bool, n: int = N) -> IntWeight:
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (n, K), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, K // 64, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    zp = None if symmetric else torch.randint(-8, 8, (n, K // 64), dtype=torch.int8, generator=g)
    return IntWeight(q, scale, zp, 4, 64)


def _weights() -> dict[str, object]:
    g = torch.Generator().manual_seed(2)
    outliers = torch.tensor([3, 77])
    return {
        "int4-sym": _int4(True),
        "int4-asym": _int4(False),
        "int4-odd-rows": _int4(True, n=96),  # 96 rows are not whole 64-row tiles: the dequantise path
        "int8": IntWeight(torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g),
                          (torch.rand(N, 1, generator=g) * 0.01).to(torch.bfloat16), None, 8, None),
        "nf4": CodebookWeight(torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g), torch.tensor(NF4_CODEBOOK),
                              torch.rand(N, K // 64, generator=g).to(torch.bfloat16), None, 64, "nf4"),
        "nf4-daq": CodebookWeight(torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g), torch.tensor(NF4_CODEBOOK),
                                  torch.rand(N, K // 64, generator=g).to(torch.bfloat16),
                                  (torch.randn(N, K // 64, generator=g) * 0.1).to(torch.bfloat16), 64, "nf4"),
        "fp8": Fp8Weight(torch.randn(N, K, generator=g).to(torch.float8_e4m3fn), torch.rand(N, 1, generator=g) * 0.01),
        "llm-int8": OutlierInt8Weight(torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g).index_fill(1, outliers, 0),
                                      torch.rand(N, 1, generator=g) * 0.01, outliers, torch.randn(N, 2, generator=g).half()),
        "llm-int8-zp": OutlierInt8Weight(torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g).index_fill(1, outliers, 0),
                                         torch.rand(N, 1, generator=g) * 0.01, outliers, torch.randn(N, 2, generator=g).half(),
                                         activation_zero_point=True),
    }


def _reference(w, x: torch.Tensor) -> torch.Tensor:
    if isinstance(w, OutlierInt8Weight):  # LLM.int8() also rounds the ordinary activations, per row
        x = _round_activations(w, x)
    return x @ w.dequantize(torch.float32).T


def _round_activations(w: OutlierInt8Weight, x: torch.Tensor) -> torch.Tensor:
    """The activations LLM.int8() multiplies: ordinary features on a per-row 8-bit grid, outliers as they are."""
    ordinary = x.index_fill(1, w.outlier_cols, 0.0)
    if w.activation_zero_point:  # 255 steps over [min(x, 0), max(x, 0)], integer zero point
        lo, hi = ordinary.amin(1, keepdim=True).clamp(max=0), ordinary.amax(1, keepdim=True).clamp(min=0)
        s = (hi - lo) / 255
        zero = torch.round(-lo / s)
        rounded = torch.clamp(torch.round(ordinary / s) + zero, 0, 255) - zero
    else:
        s = ordinary.abs().amax(1, keepdim=True) / 127
        rounded = torch.round(ordinary / s)
    return (rounded * s).index_copy(1, w.outlier_cols, x[:, w.outlier_cols])


EXPECTED_PATHS = {"int4-sym": "int4pack", "int4-asym": "int4pack", "int4-odd-rows": "dequant", "int8": "int8pack",
                  "nf4": "dequant", "nf4-daq": "dequant", "fp8": "dequant", "llm-int8": "int_mm",
                  "llm-int8-zp": "int_mm"}


@pytest.mark.parametrize("kind", list(EXPECTED_PATHS))
@pytest.mark.parametrize("rows", [1, 7, ql.PREFILL_ROWS, 64])  # decode kernels below PREFILL_ROWS, blockwise bf16 above
def test_every_path_matches_dequantise_then_matmul(kind, rows):
    w = _weights()[kind]
    module = ql.quant_linear(w)
    assert module.path == EXPECTED_PATHS[kind]
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    ref = _reference(w, x)
    got = module(x)
    # bf16 activations and bf16 scales: relative error of a few 1e-3 of the output's scale
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()
    module.exact = True
    assert torch.allclose(module(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("kind", list(EXPECTED_PATHS))
def test_module_gives_back_the_exact_weight(kind):
    w = _weights()[kind]
    assert torch.equal(ql.quant_linear(w).dequantize(), w.dequantize())


def test_blockwise_path_splits_big_weights_into_row_blocks(monkeypatch):
    monkeypatch.setattr(ql, "DEQUANT_BLOCK", 64 * K)  # 3 blocks of 64 rows
    w = _weights()["int4-asym"]
    x = torch.randn(32, K)
    ref = x @ w.dequantize().T
    assert (ql.quant_linear(w)(x) - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_bias_and_leading_dimensions_are_kept():
    w = _weights()["int8"]
    bias = torch.randn(N)
    x = torch.randn(2, 5, K)
    module = ql.quant_linear(w, bias)
    module.exact = True
    assert torch.allclose(module(x), x @ w.dequantize().T + bias, atol=1e-5)
    assert module(x).shape == (2, 5, N)


def test_dtype_move_keeps_the_weight_and_the_kernel_path():
    module = ql.quant_linear(_weights()["int4-sym"]).to(torch.float32)
    assert module.path == "int4pack"
    assert torch.equal(module.dequantize(), _weights()["int4-sym"].dequantize())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU path is optional)")
@pytest.mark.parametrize("kind", list(EXPECTED_PATHS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_path_matches_dequantise_then_matmul(kind, dtype):
    w = _weights()[kind]
    module = ql.quant_linear(w).to("cuda")  # re-laid for the device: no CPU tiles on the GPU
    assert module.path == "dequant"
    x = torch.randn(33, K, generator=torch.Generator().manual_seed(0))
    ref = _reference(w, x)
    got = module(x.to("cuda", dtype)).float().cpu()
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert torch.equal(module.to("cpu").dequantize(), w.dequantize())


@pytest.mark.parametrize("rows", [1, 64])  # the bf16 decode kernel and the shifted int8 _int_mm
def test_zero_point_activations_halve_the_error_on_skewed_rows(rows):
    """A row of mostly positive activations (as after SiLU or a biased norm) uses the whole 8-bit range."""
    w = _weights()["llm-int8-zp"]
    absmax = OutlierInt8Weight(w.q, w.scale, w.outlier_cols, w.outlier_weight)
    x = torch.rand(rows, K, generator=torch.Generator().manual_seed(5)) * 4 - 0.2
    exact = x @ w.dequantize(torch.float32).T
    err_zp = (ql.quant_linear(w)(x) - exact).norm()
    err_absmax = (ql.quant_linear(absmax)(x) - exact).norm()
    assert torch.allclose(ql.quant_linear(w)(x), _reference(w, x), rtol=1e-2, atol=1e-2 * exact.abs().max().item())
    assert err_zp < 0.7 * err_absmax


@pytest.mark.parametrize("kind", ["int4-sym", "int4-asym", "int8"])
def test_stacked_int_linear_equals_its_parts_side_by_side(kind):
    """q/k/v (and gate/up) of one integer setting stack into one module on the same kernel path."""
    from mlc.models.transformer import stacked_linear

    parts = [ql.quant_linear(_weights()[kind]) for _ in range(2)] + [ql.quant_linear(_int4(kind == "int4-sym", n=64))
                                                                    if kind != "int8" else ql.quant_linear(_weights()["int8"])]
    fused = stacked_linear(*parts)
    assert fused is not None and fused.path == parts[0].path
    for rows in (1, 3, 32):
        x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
        assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))


def test_unlike_settings_do_not_stack():
    from mlc.models.transformer import stacked_linear

    assert stacked_linear(ql.quant_linear(_int4(True)), ql.quant_linear(_int4(False))) is None
    assert stacked_linear(ql.quant_linear(_weights()["nf4"]), ql.quant_linear(_weights()["nf4"])) is None


@pytest.mark.parametrize("symmetric", [True, False])
def test_native_int4_dequantise_equals_the_formula_for_any_block_of_tiles(symmetric):
    from mlc.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    w = _int4(symmetric)
    module = ql.quant_linear(w)
    formula = w.dequantize(torch.float32)  # (q - zero_point) * scale, in fp32
    buffer = torch.empty(K * N, dtype=torch.bfloat16)
    for r0, r1 in ((0, N), (64, 128), (128, 192)):
        wt = native.dequant_int4pack_t(module._tiles, module._scales_and_zeros, N, K, 64, r0, r1, buffer)
        assert wt.shape == (K, r1 - r0)
        if symmetric:  # (u - 8) * scale is exact in fp32, then one rounding to bf16: the formula rounded
            assert torch.equal(wt.T, formula[r0:r1].to(torch.bfloat16))
        else:  # the zero point is stored as -zero_point * scale in bf16: within a bf16 step or two of the formula
            assert (wt.T.float() - formula[r0:r1]).abs().max() <= 2 ** -7 * formula.abs().max()
    assert native.dequant_int4pack_t(module._tiles, module._scales_and_zeros, N, K, 64, 32, 128, buffer) is None  # not whole tiles


def test_int4_rows_are_dequantised_from_their_own_tiles():
    module = ql.quant_linear(_int4(True))
    whole = module._dequant_rows(0, N, torch.float32)
    for r0, r1 in ((0, 64), (10, 90), (100, 192), (191, 192)):
        assert torch.equal(module._dequant_rows(r0, r1, torch.float32), whole[r0:r1])


def test_int4_prefill_takes_blocks_of_whole_tiles(monkeypatch):
    monkeypatch.setattr(ql, "INT4_PREFILL_BLOCK", 64 * K)  # 3 blocks of one tile each
    monkeypatch.setattr(ql, "DEQUANT_BLOCK", 40 * K)  # the torch path rounds 40 rows up to a whole tile
    w = _int4(False)
    module = ql.quant_linear(w)
    x = torch.randn(32, K)
    ref = x @ w.dequantize().T
    assert (module(x) - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert (ql._blockwise(x, N, module._dequant_rows, 64) - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 128])
def test_native_int4_decode_equals_the_fp32_product_rounded_once_to_bf16(symmetric, group):
    """The decode kernel multiplies the stored integers exactly and accumulates in fp32: x @ W^T in fp32, with W the
    weight the tiles and bf16 (scale, zero) pairs hold, rounded to bf16 once (ties and accumulation order can move
    a rare output by one bf16 step). torch's int4 kernel, the fallback, agrees within the same step."""
    from mlc.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    gen = torch.Generator().manual_seed(group)
    n, k = 192, 512
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)
    scale = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001).to(torch.bfloat16)
    zp = None if symmetric else torch.randint(-8, 8, (n, k // group), dtype=torch.int8, generator=gen)
    module = ql.quant_linear(IntWeight(q, scale, zp, 4, group))
    sz = module._scales_and_zeros.float()  # [K/G, N, (scale, zero)]: what the kernels compute with
    weight = (q.float().view(n, k // group, group) * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]).view(n, k)
    for rows in (1, 3, 4, 5, 15):  # registers-only rows (up to 4) and the decode-once path for more
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        ref = x.float() @ weight.T
        y = native.int4pack_mm_bf16(x, module._tiles, module._scales_and_zeros, group, not symmetric)
        step = 2.0 ** -7 * ref.abs()  # one bf16 step (at most) of each output
        assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
        assert ((y.float() - ref).abs() <= step).all()
        assert (y == ref.to(torch.bfloat16)).float().mean() > 0.99
        torch_y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, module._tiles, group, module._scales_and_zeros)
        assert ((y.float() - torch_y.float()).abs() <= 2 * step).all()
        assert torch.equal(module(x), y)  # the module's decode path is this kernel


def test_compiled_graphs_call_the_native_decode_kernels_as_operators():
    """torch.compile traces int4 decode and the bf16 gemv to mlc's operators (not torch's fallbacks), same results."""
    from mlc.kernels import native

    targets: list[object] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    module = ql.quant_linear(_int4(False))
    weight = torch.randn(128, K, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)

    def step(x):
        return module(x), native.gemv_bf16(weight, x[0])

    x = torch.randn(1, K, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.inference_mode():
        eager = step(x)
        torch._dynamo.reset()
        compiled = torch.compile(step, backend=backend, fullgraph=True)(x)
    assert torch.ops.mlc.int4pack_mm_bf16 in targets and torch.ops.mlc.gemv_bf16 in targets
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])
