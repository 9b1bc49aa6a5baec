"""`mlc bench roofline`: parameter and byte counts against transformers and safetensors, bounds computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mlc.commands.bench import roofline as rl
from tests.conftest import TINY_CONFIGS


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    """The bundled tiny Llama (2048 vocab, 4 layers, hidden 128, tied head), random weights saved in bf16."""
    from mlc import data
    from mlc.io.hfdir import read_config
    from mlc.models import build_model, save_model

    out = tmp_path_factory.mktemp("roofline") / "tiny-bf16"
    return save_model(build_model(read_config(data.tiny_model_dir()), seed=0, dtype="bfloat16"), out, tokenizer_from=data.tiny_model_dir())


@pytest.mark.parametrize("kind", ["llama", "llama_tied_bias_linear", "mixtral", "qwen2_moe"])
def test_weight_count_equals_transformers_matrices(kind):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_CONFIGS[kind])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.ndim >= 2)  # a tied head is listed once; experts may be 3-D
    assert rl.shape_of(TINY_CONFIGS[kind]).params() == matrices


def test_bf16_bytes_per_step_are_the_saved_files_tensors(tiny_bf16):
    """Everything but the embedding lookup is read each step; a tied head reads the embedding table whole."""
    from mlc.io.hfdir import read_config

    shape = rl.shape_of(read_config(tiny_bf16))
    file = tiny_bf16 / "model.safetensors"
    header_len = int.from_bytes(file.read_bytes()[:8], "little")
    tensor_bytes = file.stat().st_size - 8 - header_len
    assert rl.weight_bytes(shape, "bf16", 0) == tensor_bytes
    assert rl.step_bytes(shape, rl.stored_bytes(tiny_bf16), "stored", 1, 0, 0) == tensor_bytes


def test_quantised_layouts_by_hand():
    shape = rl.shape_of({"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "intermediate_size": 96, "vocab_size": 100, "tie_word_embeddings": True})
    mats = [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)]  # q k v o gate up down: (rows, cols)
    rest = (100 * 64 + 3 * 64) * 2  # head (tied) and three norms in bf16
    assert rl.weight_bytes(shape, "int8", 0) == sum(r * c + 2 * r for r, c in mats) + rest
    assert rl.weight_bytes(shape, "int4-g32", 0) == sum(r * c / 2 + 2 * r * math.ceil(c / 32) for r, c in mats) + rest
    assert rl.weight_bytes(shape, "fp32", 0) == sum(r * c * 4 for r, c in mats) + (100 * 64 + 3 * 64) * 4


def test_moe_expected_experts_match_a_simulation():
    shape = rl.shape_of(TINY_CONFIGS["mixtral"])  # 4 experts, top 2
    rng = np.random.default_rng(0)
    for batch in (1, 2, 5):
        hits = [len({e for _ in range(batch) for e in rng.choice(4, 2, replace=False)}) for _ in range(20000)]
        assert rl.expected_experts(shape, batch) == pytest.approx(np.mean(hits), rel=0.02)


def run_json(run_mlc, *args):
    code, out, err = run_mlc("bench", "roofline", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_decode_bounds_and_the_compute_bound_batch_by_hand(run_mlc, tiny_bf16):
    bw, flops = 1e10, 2e11
    L, h, kvh, d, V, I = 4, 128, 2, 32, 2048, 384
    blocks = L * (h * 128 + 2 * h * kvh * d + 128 * h + 3 * h * I)
    weights = 2 * (blocks + V * h + (2 * L + 1) * h)
    kv = 2 * L * kvh * d * 2
    for ctx in (16, 512):
        r = run_json(run_mlc, tiny_bf16, "--mem-bw", "10GB/s", "--flops", "200G", "--context", ctx, "--batch", "1,64", "--kv-budget", "1MiB")
        assert r["kv_bytes_per_token"] == kv == 1024
        per_token = 2 * (blocks + V * h) + 4 * L * 4 * d * ctx
        assert r["decode_flops_per_token"] == per_token
        b1, b64 = r["batches"]
        assert b1["decode_tok_s"] == pytest.approx(bw / (weights + ctx * kv)) and b1["limited_by"] == "memory"
        assert b64["decode_tok_s"] == pytest.approx(64 / max((weights + 64 * ctx * kv) / bw, 64 * per_token / flops))
        # compute-bound once B * per_token / flops >= (weights + B * ctx * kv) / bw; never if KV bytes outgrow the FLOPs
        slope = per_token / flops - ctx * kv / bw
        assert r["compute_bound_batch"] == (math.ceil((weights / bw) / slope) if slope > 0 else None)
        assert r["kv_budget_tokens"] == 2**20 // kv and r["kv_budget_concurrency"] == 2**20 // (kv * ctx)
    assert slope < 0  # at 512 tokens of context this tiny model never turns compute-bound


def test_a_result_is_set_against_the_bound_at_its_concurrency_and_context(run_mlc, tiny_bf16, tmp_path):
    result = {"completed": 10, "failed": 0, "total_input_tokens": 2560, "total_output_tokens": 1280, "output_throughput": 500.0,
              "median_tpot_ms": 20.0, "max_concurrency": 8}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    r = run_json(run_mlc, tiny_bf16, "--hardware", "h100-sxm", "--result", path)
    assert r["hardware"]["mem_bw_bytes_s"] == 3.35e12 and r["context"] == 256 + 64
    x = r["result"]
    bound = x["bound_tok_s"]
    weights = 2099456  # the tiny bf16 model's tensors (test above)
    by_hand = 8 / max((weights + 8 * 320 * 1024) / 3.35e12, 8 * r["decode_flops_per_token"] / 989.4e12)
    assert bound == pytest.approx(by_hand)
    assert x["output_fraction"] == pytest.approx(500.0 / by_hand) and x["per_stream_fraction"] == pytest.approx(50.0 / (by_hand / 8))


@pytest.mark.slow
def test_cpu_auto_measures_this_machine(run_mlc, tiny_bf16):
    r = run_json(run_mlc, tiny_bf16, "--hardware", "cpu:auto")
    hw = r["hardware"]
    assert 1e8 < hw["mem_bw_bytes_s"] < 1e13 and 1e8 < hw["flops"] < 1e15 and "measured here" in hw["source"]
    # Per CPU-second of the measurement (all its threads; above the wall rate when the wall clock ran while it waited for a core).
    assert 1e8 < hw["mem_bw_bytes_per_cpu_s"] < 1e13 and 1e8 < hw["flops_per_cpu_s"] < 1e15


@pytest.mark.parametrize(
    "args, words",
    [
        ([], "say what hardware"),
        (["--hardware", "tpu-v9"], "unknown --hardware"),
        (["--mem-bw", "fast", "--flops", "1T"], "--mem-bw 'fast'"),
        (["--hardware", "h200", "--weights", "int3"], "unknown --weights"),
        (["--hardware", "h200", "--batch", "0,2"], "bad --batch"),
        (["--hardware", "h200", "--kv-budget", "lots"], "--kv-budget"),
    ],
)
def test_bad_roofline_options_fail_in_one_line(run_mlc, tiny_bf16, args, words):
    code, out, err = run_mlc("bench", "roofline", tiny_bf16, *args)
    assert code == 2 and words in err and err.count("error:") == 1


def test_a_directory_without_a_config_is_refused(run_mlc, tmp_path):
    code, out, err = run_mlc("bench", "roofline", tmp_path, "--hardware", "h200")
    assert code == 2 and "no config.json" in err


def test_cpu_seconds_are_set_against_the_bound_per_busy_core(tiny_bf16):
    from mlc.commands.bench.hardware import Hardware
    from mlc.io.hfdir import read_config

    shape = rl.shape_of(read_config(tiny_bf16))
    hw = Hardware("cpu:auto", 1e10, 1e12, "measured", threads=2)
    result = {"completed": 1, "total_input_tokens": 100, "total_output_tokens": 100, "output_throughput": 50.0, "median_tpot_ms": 20.0,
              "max_concurrency": 1, "output_tokens_per_server_cpu_s": 40.0}
    x = rl.reached(result, shape, hw, None, "bf16", 150, 1024)
    weights = 2099456
    bound = 1e10 / (weights + 150 * 1024)  # memory-bound at batch 1 (the tiny model's FLOPs are far under 1e12/s)
    assert x["bound_tok_s"] == pytest.approx(bound) and x["per_server_cpu_s_fraction"] == pytest.approx(40.0 / (bound / 2))
    assert "per_server_cpu_s_fraction" not in rl.reached(result, shape, Hardware("h200", 4.8e12, 989e12, "datasheet"), None, "bf16", 150, 1024)
    # Measured per CPU-second (as cpu:auto does): the bound per busy core is computed from those figures instead.
    per_core = Hardware("cpu:auto", 1e10, 1e12, "measured", threads=2, mem_bw_per_cpu_s=3e9, flops_per_cpu_s=5e11)
    y = rl.reached(result, shape, per_core, None, "bf16", 150, 1024)
    assert y["bound_tok_s"] == pytest.approx(bound) and y["per_server_cpu_s_fraction"] == pytest.approx(40.0 / (3e9 / (weights + 150 * 1024)))
