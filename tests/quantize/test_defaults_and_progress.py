"""Defaults that fit the model (the group size) and progress that reaches a log without a terminal."""

from __future__ import annotations

import io
import json

import pytest

from mlc.commands.quantize.progress import ProgressLines


@pytest.mark.parametrize(("overrides", "expected"), [
    ({}, 32),  # widths 64 and 96: only 32 divides both
    ({"hidden_size": 192, "intermediate_size": 320, "head_dim": 48}, 64),  # 192 and 320: 64, not 128
    ({"hidden_size": 128, "intermediate_size": 384}, 128),
])
def test_without_group_size_the_largest_of_128_64_32_dividing_every_layer_is_chosen_and_reported(
    tiny_hf_model, run_mlc, tmp_path, overrides, expected
):
    src = tiny_hf_model("llama", **overrides)
    code, out, err = run_mlc("quantize", src, "--scheme", "int4", "--out", tmp_path / "q", "--no-eval", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["options"]["group_size"] == expected
    assert report["group_size_chosen"]["group_size"] == expected
    assert "largest of 128/64/32" in report["group_size_chosen"]["why"]
    groups = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert {g["weights"]["group_size"] for g in groups.values()} == {expected}


def test_a_given_group_size_is_kept_and_a_width_no_default_divides_is_refused(tiny_hf_model, run_mlc, tmp_path):
    src = tiny_hf_model("llama", hidden_size=80, intermediate_size=96, head_dim=20)
    code, _, err = run_mlc("quantize", src, "--scheme", "nf4", "--out", tmp_path / "q", "--no-eval")
    assert code != 0 and "no group size of 128/64/32 divides" in err and "80" in err and not (tmp_path / "q").exists()
    code, out, err = run_mlc("quantize", tiny_hf_model("llama"), "--scheme", "int8", "--out", tmp_path / "i8", "--no-eval", "--json")
    assert code == 0, err
    assert "group_size_chosen" not in json.loads(out)  # int8 is per channel: no group to choose


def test_progress_lines_give_elapsed_time_and_eta_at_most_once_per_tenth_of_quick_steps():
    now = [0.0]
    stream = io.StringIO()
    lines = ProgressLines(stream, clock=lambda: now[0])
    for done in range(1, 101):
        now[0] += 0.01
        lines("quantising", done, 100)
    out = stream.getvalue().splitlines()
    assert len(out) == 11  # the first step, then each tenth
    assert out[0] == "quantize: quantising 1/100 (1%) elapsed 0:00, ETA 0:01"
    assert out[1].startswith("quantize: quantising 10/100 (10%)")
    assert out[-1] == "quantize: quantising 100/100 (100%) elapsed 0:01"


def test_progress_lines_report_every_slow_step_with_an_eta_from_the_rate_so_far():
    now = [100.0]
    stream = io.StringIO()
    lines = ProgressLines(stream, clock=lambda: now[0])
    for done in range(1, 31):
        now[0] += 12.0  # a 12 s block: every step is a line
        lines("calibrating blocks", done, 30)
    out = stream.getvalue().splitlines()
    assert len(out) == 30
    assert out[0] == "quantize: calibrating blocks 1/30 (3%) elapsed 0:12, ETA 5:48"
    assert out[9] == "quantize: calibrating blocks 10/30 (33%) elapsed 2:00, ETA 4:00"


def test_quantize_json_without_a_terminal_reports_progress_on_stderr_and_only_json_on_stdout(small_model_dir, run_mlc, tmp_path):
    code, out, err = run_mlc("quantize", small_model_dir, "--scheme", "gptq", "--samples", "4", "--seq-len", "32",
                             "--out", tmp_path / "q", "--json", "--no-eval")
    assert code == 0, err
    assert json.loads(out)["scheme"] == "gptq"
    blocks = [line for line in err.splitlines() if line.startswith("quantize: calibrating blocks")]
    assert len(blocks) == 5 and blocks[-1].startswith("quantize: calibrating blocks 5/5 (100%) elapsed")
    assert "ETA" in blocks[1]
