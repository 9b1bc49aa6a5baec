"""`mlc quantize` end to end on a small model: every scheme's directory reloads to the weights it wrote,
transformers reads the compressed-tensors ones, and bad input fails in one line with no output left."""

import json
from pathlib import Path

import pytest
import torch

from mlc.io.hfdir import read_config
from mlc.kernels.quant_linear import QuantLinear
from mlc.models.quant_load import quant_modules
from tests.quantize.conftest import LAYOUTS, SCHEMES


def _reference_logits(model_dir: Path, quant_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """The original model with each quantised Linear's weight replaced by its dequantised weight, and its other
    tensors by the files' (AWQ scales the norms)."""
    from safetensors.torch import load_file

    from mlc.models import load_model

    model = load_model(model_dir, dtype=torch.float32)
    reloaded = load_model(quant_dir, dtype=torch.float32)
    for name, m in quant_modules(reloaded).items():
        model.get_submodule(name).weight.data = m.dequantize(torch.float32)
    params = dict(model.named_parameters())
    for f in quant_dir.glob("*.safetensors"):
        for name, t in load_file(f).items():
            if name in params and name.removesuffix(".weight") not in quant_modules(reloaded):
                params[name].data = t.float()
    return model(ids).logits


@pytest.mark.parametrize("name", [n for n in SCHEMES if n != "llm-int8"])
def test_reloaded_model_computes_with_the_weights_that_were_written(outputs, small_model_dir, name):
    out, report = outputs[name]
    from mlc.models import load_model

    model = load_model(out, dtype=torch.float32)
    modules = quant_modules(model)
    assert len(modules) == 4 * 7 == report["layers_quantized"]
    assert read_config(out)["quantization_config"].get("quant_method") == LAYOUTS.get(name, "compressed-tensors")
    ids = torch.arange(40).view(2, 20) * 37 % 2048
    with torch.no_grad():
        ref = _reference_logits(small_model_dir, out, ids)
        for m in modules.values():
            m.exact = True
        assert torch.allclose(model(ids).logits, ref, atol=1e-4)
        for m in modules.values():
            m.exact = False
        fast = model(ids).logits  # the kernels' bf16 activations
        assert (fast - ref).abs().max() < 0.05 * ref.abs().max()


def test_report_gives_perplexity_size_bits_and_worst_layers(outputs, run_mlc_module):
    out, report = outputs["int4"]
    q = report["quality"]
    assert q["perplexity_before"] > 1 and q["perplexity_after"] > 1 and q["tokens"] > 1000
    assert report["bits_per_param_quantized_layers"] == pytest.approx(4 + 16 / 32)  # bf16 scale per 32 weights
    assert report["size_bytes"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert len(report["worst_layers"]) == 5
    errors = [w["relative_error"] for w in report["worst_layers"]]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0
    saved = json.loads((run_mlc_module.runs_dir / report["run"] / "report.json").read_text())
    assert saved["scheme"] == "int4" and saved["quality"] == q


def test_mixed_meets_its_bit_budget(outputs):
    _, report = outputs["mixed"]
    assert report["bits_per_param_quantized_layers"] <= 5.0
    assert report["plan"]["layers_per_setting"]
    assert sum(report["plan"]["layers_per_setting"].values()) == 28


def test_llm_int8_reloads_with_outlier_columns(outputs):
    from mlc.models import load_model

    out, report = outputs["llm-int8"]
    model = load_model(out)
    assert all(m.path == "int_mm" and m.activation_zero_point for m in quant_modules(model).values())
    assert report["layers_quantized"] == 28
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["mlc"]["layers"]
    assert {e["activations"] for e in layers.values()} == {"zeropoint"}


# Not int4-asym: transformers 5.24 with compressed-tensors 0.20 sizes weight_zero_point unpacked while
# compressed-tensors' own compressor (and vLLM) pack it along the output dimension, so transformers
# re-initialises the zero points of any asymmetric pack-quantized checkpoint, llm-compressor's included.
@pytest.mark.parametrize("name", ["int8", "int4", "fp8", "gptq", "mixed"])
def test_transformers_loads_the_compressed_tensors_output_with_the_same_logits(outputs, small_model_dir, name):
    from transformers import AutoModelForCausalLM

    out, _ = outputs[name]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.arange(40).view(2, 20) * 37 % 2048
    with torch.no_grad():
        assert (hf(ids).logits - _reference_logits(small_model_dir, out, ids)).abs().max() < 1e-3


def _fails_cleanly(run, out: Path, *args: str) -> str:
    code, stdout, stderr = run("quantize", *args, "--out", out)
    assert code != 0
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    assert "Traceback" not in stderr
    return stderr


def test_bad_input_fails_in_one_line_and_leaves_no_output(outputs, small_model_dir, run_mlc_module, tmp_path):
    out = tmp_path / "never"
    quantized, _ = outputs["int8"]
    err = _fails_cleanly(run_mlc_module, out, str(quantized), "--scheme", "int4")
    assert "already quantised" in err
    err = _fails_cleanly(run_mlc_module, out, str(small_model_dir), "--scheme", "int4", "--group-size", "256")
    assert "takes --group-size 32, 64, 128" in err
    err = _fails_cleanly(run_mlc_module, out, str(small_model_dir), "--scheme", "nf4", "--group-size", "256")
    assert "does not divide the input features (128, 384)" in err and "use --group-size 128" in err
    err = _fails_cleanly(run_mlc_module, out, str(small_model_dir), "--scheme", "int5")
    assert "unknown quant scheme 'int5'" in err and "int4" in err and "gptq" in err and "mixed" in err
    short = tmp_path / "short.txt"
    short.write_text("too short to calibrate anything")
    err = _fails_cleanly(run_mlc_module, out, str(small_model_dir), "--scheme", "gptq", "--calib", str(short))
    assert "too short for 128 samples of 512 tokens" in err
    err = _fails_cleanly(run_mlc_module, out, str(small_model_dir), "--scheme", "int8", "--exclude", "model.*")
    assert "no Linear layers to quantise" in err
    err = _fails_cleanly(run_mlc_module, out, str(small_model_dir), "--scheme", "int8", "--group-size", "64")
    assert "does not take --group-size" in err
    err = _fails_cleanly(run_mlc_module, out, str(small_model_dir), "--scheme", "int4", "--no-act-order")
    assert "does not take --act-order" in err
    err = _fails_cleanly(run_mlc_module, out, str(small_model_dir), "--scheme", "int8", "--calib", str(short))
    assert "uses no calibration" in err


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_experts_are_quantised_and_routers_kept(tiny_hf_model, run_mlc_module, tmp_path, kind):
    from mlc.models import load_model

    src = tiny_hf_model(kind)
    out = tmp_path / "q"
    # Qwen2-MoE's shared expert is 48 wide here: no int4 group divides it, so it stays in full precision.
    exclude = ["--exclude", "*.shared_expert.down_proj"] if kind == "qwen2_moe" else []
    code, _, stderr = run_mlc_module("quantize", src, "--scheme", "int4", "--group-size", "32", "--out", out, "--no-eval", *exclude)
    assert code == 0, stderr
    model = load_model(out, dtype=torch.float32)
    names = set(quant_modules(model))
    experts = [n for n, m in model.named_modules() if ".experts." in n and isinstance(m, (torch.nn.Linear, QuantLinear))]
    assert experts and all(n in names for n in experts)
    assert not any(n.endswith((".gate", "shared_expert_gate")) for n in names)
    ids = torch.arange(24).view(2, 12) % 128
    with torch.no_grad():
        ref = _reference_logits(src, out, ids)
        for m in quant_modules(model).values():
            m.exact = True
        assert torch.allclose(model(ids).logits, ref, atol=1e-4)
