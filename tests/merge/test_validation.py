"""Everything is checked before any weight is read; every problem is reported at once, one line each;
nothing is left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .tiny import llama_config, llama_tensors, perturb, save_model


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    cfg = llama_config(layers=2)
    base = llama_tensors(cfg, 0)
    save_model(tmp_path / "base", cfg, base, [f"t{i}" for i in range(32)])
    save_model(tmp_path / "a", cfg, perturb(base, 1), [f"t{i}" for i in range(32)])
    wide = llama_config(layers=2, hidden=24, heads=4)
    save_model(tmp_path / "wide", wide, llama_tensors(wide, 3))
    save_model(tmp_path / "shuffled", cfg, perturb(base, 2), [f"t{i}" for i in reversed(range(32))])
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "readme.txt").write_text("hello")
    return tmp_path


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_every_problem_is_reported_at_once_and_no_weight_is_read(run_mlc, pool, monkeypatch):
    from mlc.io import safetensors_reader

    reads = []
    original = safetensors_reader.ModelTensors.read
    monkeypatch.setattr(safetensors_reader.ModelTensors, "read", lambda self, *a, **k: reads.append(a) or original(self, *a, **k))
    cfg = write_yaml(
        pool / "bad.yml",
        {
            "merge_method": "ties",
            "base_model": str(pool / "base"),
            "models": [
                {"model": str(pool / "a"), "parameters": {"weight": 0.5, "density": 1.5}},
                {"model": str(pool / "missing"), "parameters": {"weight": 0.5}},
                {"model": str(pool / "notamodel"), "parameters": {"weight": 0.5}},
                {"model": str(pool / "wide"), "parameters": {"weight": 0.5}},
                {"model": str(pool / "shuffled"), "parameters": {"weight": 0.5, "desnity": 0.3}},
            ],
            "dtype": "float8",
        },
    )
    out = pool / "out"
    code, _, err = run_mlc("merge", cfg, "--out", out)
    assert code == 1
    lines = [line.strip() for line in err.splitlines() if line.strip().startswith("- ")]
    text = "\n".join(lines)
    assert "dtype 'float8' is not one of" in text
    assert "missing does not exist" in text
    assert "notamodel" in text and "no config.json" in text
    assert "did you mean 'density'" in text
    assert "density must be in (0, 1], got 1.5" in text
    # One line for all of a model's misshaped tensors, the first few named.
    assert "wide: 20 tensors have other shapes (model.embed_tokens.weight has shape [32, 24], expected [32, 16]; " in text
    assert "tokenizer of" in text and "shuffled" in text and "tokenizer_source: union" in text
    assert len(lines) >= 7
    assert not out.exists() and not list(pool.glob(".out*"))  # no output, not even a staging directory
    assert reads == []


def test_layer_ranges_slice_lengths_and_method_input_counts_are_checked(run_mlc, pool):
    cfg = write_yaml(
        pool / "slices.yml",
        {
            "merge_method": "slerp",
            "base_model": str(pool / "base"),
            "slices": [
                {"sources": [{"model": str(pool / "base"), "layer_range": [0, 2]}, {"model": str(pool / "a"), "layer_range": [0, 3]}]},
                {"sources": [{"model": str(pool / "base"), "layer_range": [1, 2]}, {"model": str(pool / "a"), "layer_range": [1, 2]}, {"model": str(pool / "shuffled"), "layer_range": [1, 2]}]},
            ],
            "parameters": {"t": 1.5},
        },
    )
    code, _, err = run_mlc("merge", cfg, "--out", pool / "out")
    assert code == 1
    assert "layer_range [0, 3] of" in err and "goes past its 2 layers" in err
    assert "every source must span the same number of layers" in err
    assert "slerp takes at most 1 model(s) besides the base, got 2" in err
    assert "t must be in [0, 1], got 1.5" in err


def test_yaml_structure_errors_are_listed_together(run_mlc, pool):
    sources = [{"model": "x", "layer_range": [3, 1]}, {"model": "y", "layer_range": "all"}]
    cfg = write_yaml(pool / "shape.yml", {"merge_method": "linear", "modls": [], "slices": [{"sources": sources, "residual_weight": 1}]})
    code, _, err = run_mlc("merge", cfg, "--out", pool / "out")
    assert code == 1
    assert "unknown key 'modls'" in err
    assert "layer_range [3, 1] is empty or negative" in err
    assert "slices[0].sources[1].layer_range must be [start, end] with integers, got 'all'" in err  # brackets printed as text
    assert "unknown key 'residual_weight' in slices[0]" in err


def test_existing_output_needs_overwrite_and_check_mode_writes_nothing(run_mlc, pool):
    cfg = write_yaml(pool / "ok.yml", {"merge_method": "linear", "models": [{"model": str(pool / "base"), "parameters": {"weight": 1}}, {"model": str(pool / "a"), "parameters": {"weight": 1}}]})
    (pool / "taken").mkdir()
    code, _, err = run_mlc("merge", cfg, "--out", pool / "taken")
    assert code == 1 and "already exists" in err
    code, out, _ = run_mlc("--json", "merge", cfg, "--out", pool / "fresh", "--check")
    assert code == 0 and json.loads(out)["tensors"] == 1 + 2 * 9 + 1
    assert not (pool / "fresh").exists()


def test_a_failure_during_the_merge_leaves_no_output(run_mlc, pool, monkeypatch):
    from mlc.commands.merge import executor

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(executor, "merge_job", boom)
    cfg = write_yaml(pool / "ok.yml", {"merge_method": "linear", "models": [{"model": str(pool / "base"), "parameters": {"weight": 1}}, {"model": str(pool / "a"), "parameters": {"weight": 1}}]})
    code, _, err = run_mlc("merge", cfg, "--out", pool / "out")
    assert code == 1 and "disk on fire" in err
    assert not (pool / "out").exists() and not list(pool.glob(".out*"))


def test_a_parameter_only_other_methods_use_is_a_warning_not_an_error(run_mlc, pool):
    cfg = write_yaml(pool / "warn.yml", {"merge_method": "linear", "models": [{"model": str(pool / "base"), "parameters": {"weight": 1}}, {"model": str(pool / "a"), "parameters": {"weight": 1, "density": 0.5}}]})
    code, _, err = run_mlc("merge", cfg, "--out", pool / "out")
    assert code == 0 and "'density' is not used by linear" in err


def test_chat_template_by_name_auto_or_jinja_and_unknown_names_are_refused(run_mlc, pool):
    from mlc.commands.merge.chat_templates import TEMPLATES

    models = [{"model": str(pool / "base"), "parameters": {"weight": 1}}, {"model": str(pool / "a"), "parameters": {"weight": 1}}]
    (pool / "a" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    for choice, expected in (("chatml", TEMPLATES["chatml"]), ("auto", "{{ messages[0]['content'] }}"), ("{{ 'x' }}", "{{ 'x' }}")):
        cfg = write_yaml(pool / "chat.yml", {"merge_method": "linear", "models": models, "chat_template": choice})
        code, _, err = run_mlc("merge", cfg, "--out", pool / "out", "--overwrite")
        assert code == 0, err
        assert (pool / "out" / "chat_template.jinja").read_text() == expected
    cfg = write_yaml(pool / "chat.yml", {"merge_method": "linear", "models": models, "chat_template": "vicuna-ish"})
    code, _, err = run_mlc("merge", cfg, "--out", pool / "out2")
    assert code == 1 and "chat_template 'vicuna-ish' is not auto" in err


def test_a_llama_and_a_gpt2_are_refused_in_a_few_lines(run_mlc, pool, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=32)).save_pretrained(tmp_path / "gpt2")
    cfg = write_yaml(tmp_path / "mixed.yml", {"merge_method": "linear", "models": [{"model": str(pool / "base"), "parameters": {"weight": 0.5}}, {"model": str(tmp_path / "gpt2"), "parameters": {"weight": 0.5}}]})
    code, _, err = run_mlc("merge", cfg, "--out", tmp_path / "out")
    assert code == 1 and "Traceback" not in err
    assert err.count("\n  - ") <= 2, err  # the architectures, and one line for the tensors GPT-2 lacks
    text = " ".join(err.split())  # long lines wrap on the console
    assert "is a GPT2LMHeadModel, but" in text and "LlamaForCausalLM: architectures must match" in text
    assert "gpt2 lacks 20 tensors the merge needs (model.embed_tokens.weight, model.layers.0.input_layernorm.weight, " in text


def test_an_output_location_that_refuses_files_is_one_line_before_any_work(run_mlc, pool, tmp_path):
    import os

    if os.geteuid() == 0:  # root writes anywhere a normal permission bit says no: use a filesystem that refuses it
        target = Path("/sys/mlc-merge-out")
        try:
            os.close(os.open("/sys/.mlc-probe", os.O_CREAT | os.O_WRONLY))
            pytest.skip("/sys accepts files here")
        except OSError:
            pass
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        target = locked / "out"
    cfg = write_yaml(tmp_path / "ok.yml", {"merge_method": "linear", "models": [{"model": str(pool / m), "parameters": {"weight": 0.5}} for m in ("base", "a")]})
    code, _, err = run_mlc("merge", cfg, "--out", target)
    assert code == 1 and "Traceback" not in err and "unexpected" not in err
    text = " ".join(err.split())
    assert f"cannot write the output {target}" in text and "refuses new files" in text


def test_a_full_disk_is_one_line_and_leaves_no_output(run_mlc, pool, monkeypatch):
    import errno
    import os

    from mlc.commands.merge import executor

    def full(*args, **kwargs):  # what a write on a full filesystem raises (an injected fault: no small filesystem here)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(executor, "merge_job", full)
    cfg = write_yaml(pool / "ok.yml", {"merge_method": "linear", "models": [{"model": str(pool / "base"), "parameters": {"weight": 1}}, {"model": str(pool / "a"), "parameters": {"weight": 1}}]})
    code, _, err = run_mlc("merge", cfg, "--out", pool / "full")
    text = " ".join(err.split())
    assert code == 1 and "unexpected" not in text and "Traceback" not in text
    assert f"no space left on the disk holding {pool.absolute()} while writing the merged model" in text and "pass --out on a disk with room" in text
    assert not (pool / "full").exists() and not list(pool.glob(".full*"))
