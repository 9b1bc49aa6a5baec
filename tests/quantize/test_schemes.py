"""The quantisers, each checked against a hand computation or a simpler independent method."""

import pytest
import torch

from mlc.commands.quantize import daq, gptq, llm_int8, rtn
from mlc.kernels.quant_weights import NF4_CODEBOOK


def _weight(n=64, k=128, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_int8_per_channel_error_is_half_a_step_except_where_the_top_value_clips():
    w = _weight()
    q = rtn.quantize_int(w, 8, None, symmetric=True)
    step = q.scale.float()
    assert q.scale.shape == (64, 1)
    assert torch.allclose(step, w.abs().amax(1, keepdim=True) / 127.5, rtol=4e-3)  # bf16-rounded absmax / 127.5
    err = (w - q.dequantize()).abs()
    inside = q.q < 127
    assert (err[inside] <= (step / 2).expand_as(err)[inside] * (1 + 1e-5)).all()
    assert (err <= step).all()


def test_asymmetric_int4_reproduces_weights_that_sit_on_a_4_bit_grid():
    # Each group of 32 is 16 levels of one step above its minimum, as GGUF Q4_1 blocks are; the
    # minimum is a whole number of steps, so an integer zero point represents it exactly.
    g = torch.Generator().manual_seed(3)
    step = torch.tensor([2.0 ** -e for e in range(5, 9)]).repeat(16)[:, None, None]  # bf16-exact steps
    levels = torch.randint(0, 16, (64, 4, 32), generator=g).float()
    levels[..., 0], levels[..., 1] = 0, 15  # every group spans the full range
    w = ((levels - 7) * step).reshape(64, 128)
    q = rtn.quantize_int(w, 4, 32, symmetric=False)
    assert torch.equal(q.dequantize(), w)


def test_symmetric_int4_maps_the_most_negative_weight_to_minus_8():
    w = torch.tensor([[-0.9375, 0.5, 0.25, 0.875]])  # absmax / 7.5 = 1/8, exact in bf16
    q = rtn.quantize_int(w, 4, None, symmetric=True)
    assert q.scale.float().item() == 0.125
    assert q.q.tolist() == [[-8, 4, 2, 7]]


def test_nf4_picks_the_nearest_code_book_entry_of_the_absmax_normalised_weight():
    w = _weight(8, 64)
    q = rtn.quantize_codebook(w, "nf4", 64)
    cb = torch.tensor(NF4_CODEBOOK)
    absmax = w.abs().amax(1, keepdim=True).to(torch.bfloat16).float()
    expected = cb[(w / absmax).unsqueeze(-1).sub(cb).abs().argmin(-1)] * absmax  # brute force over all 16 codes
    assert torch.allclose(q.dequantize(), expected)


def test_fp8_is_torch_e4m3_rounding_of_the_row_scaled_weight():
    w = _weight()
    q = rtn.quantize_fp8(w)
    scale = w.abs().amax(1, keepdim=True) / 448
    assert torch.equal(q.value, (w / scale).to(torch.float8_e4m3fn))


def _correlated_inputs(k=128, tokens=2048, seed=5):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.5 * torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(tokens, k, generator=g) @ mix
    x[:, :4] *= 8  # a few strong features, as real activations have
    return x


def _output_error(x, w, q):
    return float(((x @ (w - q.dequantize()).T) ** 2).mean())


def test_gptq_with_an_identity_hessian_is_round_to_nearest():
    # No correlation between inputs: the error feedback has nowhere to go, so GPTQ reduces to RTN.
    w = _weight()
    for group, sym in ((None, True), (32, True), (32, False)):
        bits = 8 if group is None else 4
        got = gptq.quantize_gptq(w, torch.eye(128), bits, group, sym)
        ref = rtn.quantize_int(w, bits, group, sym)
        assert torch.equal(got.q, ref.q) and torch.equal(got.scale, ref.scale)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error_below_round_to_nearest(act_order, symmetric):
    # Asymmetric too: on SmolLM2 (weights on GGUF Q4_1's asymmetric g32 grid) asymmetric GPTQ g64 ties with
    # asymmetric RTN, so this pins down that its zero-point path does feed the error forward.
    x, w = _correlated_inputs(), _weight()
    h = x.T @ x
    got = gptq.quantize_gptq(w, h, 4, 32, symmetric, act_order=act_order)
    assert _output_error(x, w, got) < 0.8 * _output_error(x, w, rtn.quantize_int(w, 4, 32, symmetric))


def test_daq_lowers_the_output_error_of_plain_nf4():
    x, w = _correlated_inputs(), _weight()
    h = x.T @ x / x.shape[0]
    plain = rtn.quantize_codebook(w, "nf4", 64)
    tuned = daq.quantize_daq(w, "nf4", 64, h)
    assert tuned.zero is not None and tuned.zero.shape == (64, 2)
    assert _output_error(x, w, tuned) < 0.8 * _output_error(x, w, plain)


def test_llm_int8_keeps_the_outlier_columns_in_fp16_and_quantises_the_rest_per_row():
    w = _weight()
    absmax = torch.ones(128)
    absmax[[5, 9]] = 6.0  # at the threshold counts as an outlier
    absmax[7] = 5.99
    q = llm_int8.quantize_llm_int8(w, absmax)
    assert q.outlier_cols.tolist() == [5, 9]
    assert torch.equal(q.outlier_weight, w[:, [5, 9]].half())
    ordinary = w.index_fill(1, torch.tensor([5, 9]), 0.0)
    assert torch.allclose(q.scale, ordinary.abs().amax(1, keepdim=True) / 127)
    assert (q.q[:, [5, 9]] == 0).all()


def test_gptq_orders_by_activation_unless_told_not_to_and_other_schemes_refuse_the_flag():
    from mlc.commands.quantize.schemes import GPTQ, INT4
    from mlc.contracts import SchemeOptions
    from mlc.errors import MlcUsageError

    assert GPTQ.options(SchemeOptions()).act_order is True
    assert GPTQ.options(SchemeOptions(act_order=False)).act_order is False
    assert GPTQ.options(SchemeOptions(bits=8)).act_order is True
    assert INT4.options(SchemeOptions()).act_order is None
    for flag in (True, False):
        with pytest.raises(MlcUsageError, match="does not take --act-order"):
            INT4.options(SchemeOptions(act_order=flag))




@pytest.mark.parametrize("stat_name", ["absmax", "hessian"])
def test_an_input_shared_by_several_linears_is_reduced_once_and_a_new_one_never_taken_for_it(stat_name):
    # q/k/v share one input tensor; gate/up's comes later with the same shape, possibly in q/k/v's freed memory.
    import weakref

    from mlc.commands.quantize.layerwise import STATS

    cache: dict = {}
    q, k, gate = STATS[stat_name](4), STATS[stat_name](4), STATS[stat_name](4)
    x = torch.ones(2, 3, 4)
    q.add(x, cache)
    reduced = {key: v for key, v in cache.items() if key != "input"}
    k.add(x, cache)
    assert all(cache[key] is v for key, v in reduced.items())  # k reuses q's reduction
    alive = weakref.ref(x)
    del x
    assert alive() is not None  # held until the next input, so its memory cannot be handed to that one
    gate.add(torch.full((2, 3, 4), 7.0), cache)
    assert alive() is None
    expected = torch.full((4,), 7.0) if stat_name == "absmax" else torch.full((4, 4), 49.0)
    assert torch.equal(gate.value(), expected) and torch.equal(k.value(), expected / 7 ** (1 if stat_name == "absmax" else 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_absmax_statistic_is_max_abs_x_per_feature_also_for_signed_zeros_infinities_and_subnormals(dtype):
    from mlc.commands.quantize.layerwise import abs_max

    x = torch.randn(300, 7, generator=torch.Generator().manual_seed(0)).to(dtype) * 5
    x[:, 0] = -0.0
    x[3, 1] = -float("inf")
    x[:, 2] = -torch.finfo(dtype).tiny / 4  # subnormal
    x[5, 3] = -7.5
    got = abs_max(x)
    assert got.dtype == torch.float32 and torch.equal(got, x.abs().amax(dim=0).float())
    assert got[0] == 0 and got[1] == float("inf") and got[3] >= 7.5


def test_a_last_block_whose_outputs_nobody_reads_is_cut_short_with_the_same_statistics(small_model_dir):
    # llm-int8's last block: its down_proj input is the last statistic; the down GEMM and residual are skipped.
    from mlc.commands.quantize.layerwise import LayerJob, quantize_layerwise
    from mlc.commands.quantize.quantize import meta_model
    from mlc.io.safetensors_reader import ModelTensors

    tokens = torch.randint(0, 2048, (3, 16), generator=torch.Generator().manual_seed(0))
    seen: dict = {}

    def job(name):
        def quantize(w, stat):
            seen[name] = stat.clone()
            return llm_int8.quantize_llm_int8(w, stat)

        return LayerJob("absmax", quantize)

    def run(names):
        seen.clear()
        with ModelTensors(small_model_dir) as t:
            quantize_layerwise(t, meta_model(small_model_dir), tokens, {n: job(n) for n in names}, lambda n, w, q: q)
        return dict(seen)

    last = [f"model.layers.3.{m}" for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")]
    cut = run(last)
    with_head = run(last + ["lm_head"])  # the same block when its outputs are needed (they feed lm_head)
    assert cut.keys() == set(last) and all(torch.equal(cut[n], with_head[n]) for n in last)
