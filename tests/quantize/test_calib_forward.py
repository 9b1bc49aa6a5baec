"""LLM.int8's fused calibration forward (calib_forward.py, calib_kernels.c) against the block's module forward and hooks."""

import copy

import pytest
import torch
import torch.nn.functional as F

from mlc.commands.quantize import calib_forward

pytestmark = pytest.mark.skipif(calib_forward.library() is None, reason=f"{calib_forward.unavailable_reason()}")


def _config(hidden, heads, kv_heads, head_dim, inner):
    from mlc.models.config import config_from_hf

    return config_from_hf({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": hidden,
        "intermediate_size": inner, "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    })


def _layer(hidden, heads, kv_heads, head_dim, inner, seed=0):
    from mlc.models.transformer import DecoderLayer

    config = _config(hidden, heads, kv_heads, head_dim, inner)
    layer = DecoderLayer(config, 0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if "norm" in name else 0.15 * torch.randn(p.shape, generator=g))
    return layer.to(torch.bfloat16), config


def _rope(config, t):
    from mlc.models.rope import RotaryTable

    return RotaryTable(config).cos_sin(torch.arange(t).unsqueeze(0), torch.bfloat16)


def _hooked(layer, x, cos, sin):
    """The module forward's output and max |x| of each Linear's input, through forward pre-hooks."""
    seen = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).abs().amax(0).float()))
               for n, m in layer.named_modules() if n in calib_forward.GROUPS]
    y = layer(x, cos, sin)[0]
    for h in handles:
        h.remove()
    return y, seen


@pytest.mark.parametrize("shape", [(128, 4, 2, 32, 384), (192, 3, 1, 64, 320)])
def test_the_fused_forward_is_as_close_to_the_fp32_block_as_the_bf16_module_and_so_are_its_maxima(shape):
    # Two head sizes (the 64-wide output tiles and the 32-wide tail), GQA, 37 tokens: tails of every tile size. The
    # reference is the same block in fp32; the bf16 module forward and the fused one each round on their own.
    layer, config = _layer(*shape)
    b, t = 3, 37
    x = torch.randn(b, t, shape[0], generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    cos, sin = _rope(config, t)
    with torch.no_grad():
        module, module_max = _hooked(layer, x, cos, sin)
        exact, exact_max = _hooked(copy.deepcopy(layer).float(), x.float(), cos.float(), sin.float())
        block = calib_forward.fused_block(layer, cos, sin)
        assert block is not None
        maxima = {g: torch.zeros(layer.get_submodule(n).in_features) for n, g in calib_forward.GROUPS.items()}
        got = block(x, maxima, need_output=True)
        out = torch.empty_like(x)
        assert block(x, {}, True, out=out) is out and torch.equal(out, got)
        assert block(x, {}, need_output=False) is None
    assert got.dtype == torch.bfloat16 and got.shape == module.shape
    err, module_err = (got.float() - exact).abs(), (module.float() - exact).abs()
    assert err.mean() <= 1.1 * module_err.mean() and err.max() <= 1.5 * module_err.max()
    for name, group in calib_forward.GROUPS.items():
        err, module_err = (maxima[group] - exact_max[name]).abs(), (module_max[name] - exact_max[name]).abs()
        assert err.mean() <= 1.1 * module_err.mean() + 1e-6 and err.max() <= 1.5 * module_err.max() + 1e-6, name


def test_the_attention_kernel_is_as_close_to_exact_attention_as_torch_s_bf16_flash_kernel():
    from mlc.models.rope import apply_rope

    b, t, heads, kv, d = 2, 77, 6, 2, 64
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(b * t, n * d, generator=g).mul(s).to(torch.bfloat16) for n, s in ((heads, 3.0), (kv, 3.0), (kv, 1.0)))
    cos, sin = _rope(_config(heads * d, heads, kv, d, 64), t)
    amax = torch.zeros(heads * d)
    got = calib_forward.rope_attention(q, k, v, cos.reshape(t, d), sin.reshape(t, d), b, d, amax)

    def heads_of(x):
        return x.view(b, t, -1, d).transpose(1, 2)

    qr, kr = apply_rope(heads_of(q), cos, sin), apply_rope(heads_of(k), cos, sin)  # the model's bf16 rotation
    exact = F.scaled_dot_product_attention(qr.double(), kr.double(), heads_of(v).double(), is_causal=True, enable_gqa=True)
    flash = F.scaled_dot_product_attention(qr, kr, heads_of(v), is_causal=True, enable_gqa=True)

    def flat(x):
        return x.transpose(1, 2).reshape(b * t, heads * d)

    err, flash_err = (flat(exact) - got.double()).abs(), (flat(exact) - flat(flash).double()).abs()
    assert err.max() <= 2 * flash_err.max() and err.mean() <= 1.25 * flash_err.mean()
    assert torch.equal(amax, got.float().abs().amax(0))


def test_norm_and_silu_round_like_torch_s_bf16_ops():
    g = torch.Generator().manual_seed(3)
    x, r = (torch.randn(50, 96, generator=g).mul(4).to(torch.bfloat16) for _ in range(2))
    w = (1 + 0.3 * torch.randn(96, generator=g)).to(torch.bfloat16)
    amax = torch.zeros(96)
    h, y = calib_forward.add_rms_norm(x, r, w, 1e-5, amax)
    want_h = x + r
    want = w * F.rms_norm(want_h.float(), (96,), None, 1e-5).to(torch.bfloat16)
    assert torch.equal(h, want_h)
    assert ((y.float() - want.float()).abs() <= 2 ** -7 * want.float().abs()).all() and (y != want).float().mean() < 0.02
    assert torch.equal(amax, y.float().abs().amax(0))
    amax = torch.zeros(96)
    act = calib_forward.silu_mul(x, r, amax)
    want = F.silu(x) * r
    assert ((act.float() - want.float()).abs() <= 2 ** -7 * want.float().abs()).all() and (act != want).float().mean() < 0.02
    assert torch.equal(amax, act.float().abs().amax(0))


def test_llm_int8_calibration_runs_the_fused_forward_and_finds_the_hooks_outliers(small_model_dir, monkeypatch):
    from mlc.commands.quantize import layerwise, llm_int8
    from mlc.commands.quantize.quantize import meta_model, target_layers
    from mlc.io.safetensors_reader import ModelTensors

    tokens = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    names = list(target_layers(meta_model(small_model_dir), [], False))

    def run():
        seen = {}

        def job(name):
            def quantize(w, stat):
                seen[name] = stat.clone()
                return llm_int8.quantize_llm_int8(w, stat)

            return layerwise.LayerJob("absmax", quantize)

        with ModelTensors(small_model_dir) as t:
            layerwise.quantize_layerwise(t, meta_model(small_model_dir), tokens, {n: job(n) for n in names}, lambda n, w, q: q)
        return seen

    made = []
    real = layerwise.fused_block
    monkeypatch.setattr(layerwise, "fused_block", lambda *a: made.append(real(*a)) or made[-1])
    fused = run()
    assert len(made) == 4 and all(made)  # every block ran fused
    monkeypatch.setattr(layerwise, "fused_block", lambda *a: None)
    hooked = run()
    monkeypatch.setattr(layerwise, "COMPUTE_DTYPE", torch.float32)  # the reference: the module forward in fp32
    exact = run()
    assert fused.keys() == hooked.keys() == exact.keys() == set(names)
    # Each bf16 path rounds on its own, and the blocks' outputs feed the next ones: both are as far from fp32.
    err, hooked_err = (torch.cat([(run_[n] - exact[n]).abs() / exact[n] for n in names]) for run_ in (fused, hooked))
    assert err.mean() <= 1.1 * hooked_err.mean() and err.max() <= 1.5 * hooked_err.max()
