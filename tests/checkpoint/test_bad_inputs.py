"""Hostile checkpoints: each gives one line naming the file and the problem, exit 1, and no output directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def copy_step(train_run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "step-00000004"
    shutil.copytree(train_run_dir / "checkpoints" / "step-00000004", dst)
    return dst


def refused(run_mlc, tmp_path: Path, *args: object) -> str:
    out = tmp_path / "out"
    code, _, err = run_mlc("checkpoint", "convert", *args, "--out", out)
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err
    assert not out.exists() and not list(tmp_path.glob(".out.mlc-tmp-*"))
    return errors[0]


def test_a_missing_dcp_shard_is_named(train_run_dir, tmp_path, run_mlc):
    step = copy_step(train_run_dir, tmp_path)
    (step / "__0_0.distcp").unlink()
    err = refused(run_mlc, tmp_path, step, "--to", "hf")
    assert "__0_0.distcp is missing" in err


def test_a_truncated_dcp_shard_is_named(train_run_dir, tmp_path, run_mlc):
    from mlc.data import tiny_model_dir

    step = copy_step(train_run_dir, tmp_path)
    data = (step / "__0_0.distcp").read_bytes()
    (step / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    err = refused(run_mlc, tmp_path, step, "--to", "hf", "--config", tiny_model_dir())
    assert "__0_0.distcp is truncated" in err


def test_a_missing_hf_shard_is_named(tiny_hf_model, tmp_path, run_mlc):
    code, _, err = run_mlc("checkpoint", "convert", tiny_hf_model("llama"), "--to", "hf", "--out", tmp_path / "sharded", "--max-shard-size", "100KB")
    assert code == 0, err
    second = sorted((tmp_path / "sharded").glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    err = refused(run_mlc, tmp_path, tmp_path / "sharded", "--to", "dcp")
    assert f"missing shard {second.name}" in err


def test_a_truncated_safetensors_file_is_named(tiny_hf_model, tmp_path, run_mlc):
    src = tmp_path / "model"
    shutil.copytree(tiny_hf_model("llama"), src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 1000])
    err = refused(run_mlc, tmp_path, src, "--to", "universal")
    assert "model.safetensors is not a valid safetensors file" in err


def test_junk_after_a_gguf_header_is_a_one_line_error(tmp_path, run_mlc, smollm2_gguf):
    junk = tmp_path / "broken.gguf"
    with open(smollm2_gguf, "rb") as f:
        head = f.read(24)  # magic, version, tensor count, metadata count
    junk.write_bytes(head + b"\xff" * 4096)
    err = refused(run_mlc, tmp_path, junk, "--to", "hf")
    assert "broken.gguf is not a readable GGUF file" in err


def test_an_unknown_source_format_is_named(tiny_hf_model, tmp_path, run_mlc):
    err = refused(run_mlc, tmp_path, tiny_hf_model("llama"), "--to", "hf", "--from", "onnx")
    assert "onnx" in err


def test_an_hf_directory_passed_as_dcp_says_what_it_is(tiny_hf_model, tmp_path, run_mlc):
    err = refused(run_mlc, tmp_path, tiny_hf_model("llama"), "--to", "hf", "--from", "dcp")
    assert "is not a dcp checkpoint (it looks like hf)" in err


def test_an_unrecognised_directory_says_what_it_holds_without_a_plugin_hint(tmp_path, run_mlc):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hello")
    err = refused(run_mlc, tmp_path, tmp_path / "stuff", "--to", "hf")
    assert "notes.txt" in err and "pip install" not in err


@pytest.mark.parametrize("flag,value", [("--quant", "Q8_0"), ("--tp", "2")])
def test_an_option_the_target_format_does_not_use_is_refused(flag, value, tiny_hf_model, tmp_path, run_mlc):
    code, _, err = run_mlc("checkpoint", "convert", tiny_hf_model("llama"), "--to", "hf", "--out", tmp_path / "o", flag, value)
    assert code == 2 and flag in err
