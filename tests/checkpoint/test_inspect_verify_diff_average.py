"""inspect, verify, diff and average against hand computations on real checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.checkpoint.conftest import safetensors_state, torch_reference_state


def step(run_dir: Path, n: int) -> Path:
    return run_dir / "checkpoints" / f"step-{n:08d}"


def flip_byte(file: Path, at: float = 0.6) -> None:
    n = file.stat().st_size
    with open(file, "r+b") as f:
        f.seek(int(n * at))
        b = f.read(1)
        f.seek(int(n * at))
        f.write(bytes([b[0] ^ 0x01]))


def test_inspect_reports_step_world_size_dtypes_and_optimizer_state(train_run_dir, run_mlc):
    code, out, err = run_mlc("checkpoint", "inspect", step(train_run_dir, 4), "--json", "--tensors")
    assert code == 0, err
    r = json.loads(out)
    reference = torch_reference_state(step(train_run_dir, 4))
    weights = {k: v for k, v in reference.items() if k.startswith("train.model.")}
    optim = {k: v for k, v in reference.items() if k.startswith("train.optim.state.")}
    assert r["format"] == "dcp" and r["step"] == 4 and r["world_size"] == 1 and r["optimizer_state"] is True
    assert r["parameters"] == sum(v.numel() for v in weights.values())
    assert r["weight_bytes"] == sum(v.numel() * v.element_size() for v in weights.values())
    assert r["optimizer_bytes"] == sum(v.numel() * v.element_size() for v in optim.values())
    assert r["dtypes"]["float32"]["tensors"] == len(weights)
    names = {t["name"] for t in r["tensor_list"]}
    assert "model.norm.weight/exp_avg_sq" in names and "model.norm.weight" in names
    code, out, _ = run_mlc("checkpoint", "inspect", step(train_run_dir, 4), "--tensors")
    assert code == 0 and "q_proj.weight" in out and "optimizer state yes" in out


def test_verify_passes_a_good_step_and_names_a_flipped_byte_in_a_shard(train_run_dir, tmp_path, run_mlc):
    assert run_mlc("checkpoint", "verify", step(train_run_dir, 4))[0] == 0
    bad = tmp_path / "step-00000004"
    shutil.copytree(step(train_run_dir, 4), bad)
    flip_byte(bad / "__0_0.distcp")
    code, out, _ = run_mlc("checkpoint", "verify", bad)
    assert code == 1
    assert "__0_0.distcp" in out and "CRC-32 mismatch" in out


def test_verify_names_a_missing_complete_marker_and_a_missing_shard(train_run_dir, tmp_path, run_mlc):
    bad = tmp_path / "step-00000004"
    shutil.copytree(step(train_run_dir, 4), bad)
    (bad / "COMPLETE").unlink()
    code, out, _ = run_mlc("checkpoint", "verify", bad)
    assert code == 1 and "COMPLETE is missing" in out
    (bad / "__0_0.distcp").unlink()
    code, out, _ = run_mlc("checkpoint", "verify", bad, "--json")
    assert code == 1 and any("__0_0.distcp is missing" in p for p in json.loads(out)["problems"])


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_verify_checks_an_hf_output_against_its_manifest(damage, tiny_hf_model, tmp_path, run_mlc):
    out = tmp_path / "hf"
    assert run_mlc("checkpoint", "convert", tiny_hf_model("llama"), "--to", "hf", "--out", out, "--max-shard-size", "100KB")[0] == 0
    assert run_mlc("checkpoint", "verify", out)[0] == 0
    shard = sorted(out.glob("model-00002-of-*.safetensors"))[0]
    if damage == "flip":
        flip_byte(shard)
    elif damage == "truncate":
        os.truncate(shard, shard.stat().st_size - 10)
    else:
        shard.unlink()
    code, stdout, _ = run_mlc("checkpoint", "verify", out)
    assert code == 1
    lines = [line for line in stdout.splitlines() if line.startswith("bad")]
    expected = {"flip": "changed since it was written", "truncate": "is truncated", "remove": "is missing"}[damage]
    assert shard.name in lines[0] and expected in lines[0]


def test_verify_finds_non_finite_values(tiny_hf_model, tmp_path, run_mlc):
    from safetensors.torch import save_file

    src = tmp_path / "m"
    shutil.copytree(tiny_hf_model("llama"), src)
    state = safetensors_state(src)
    state["model.norm.weight"][3] = float("nan")
    save_file(state, src / "model.safetensors")
    code, out, _ = run_mlc("checkpoint", "verify", src)
    assert code == 1 and "'model.norm.weight' holds 1 non-finite" in out


def test_diff_reports_max_abs_relative_and_cosine_per_tensor(tiny_hf_model, tmp_path, run_mlc):
    from safetensors.torch import save_file

    a = tiny_hf_model("llama")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    state = safetensors_state(a)
    moved = state["model.layers.1.mlp.down_proj.weight"]
    state["model.layers.1.mlp.down_proj.weight"] = moved + 0.01
    save_file(state, b / "model.safetensors")
    code, out, err = run_mlc("checkpoint", "diff", a, b, "--json")
    assert code == 0, err
    r = json.loads(out)
    rows = {t["name"]: t for t in r["tensors"]}
    row = rows["model.layers.1.mlp.down_proj.weight"]
    x, y = moved.double().flatten(), (moved + 0.01).double().flatten()
    assert row["max_abs"] == pytest.approx(0.01, rel=1e-4)
    assert row["relative"] == pytest.approx(((x - y).norm() / x.norm()).item(), rel=1e-9)
    assert row["cosine"] == pytest.approx((x @ y / (x.norm() * y.norm())).item(), rel=1e-12)
    assert rows["model.norm.weight"]["max_abs"] == 0 and r["layers"][0]["layer"] == "layer 1" and not r["identical"]


@pytest.mark.slow
def test_average_uniform_of_a_runs_steps_is_the_mean_with_lineage_and_perplexities(train_run_dir, tmp_path, run_mlc):
    from mlc.data import eval_text_path

    held_out = tmp_path / "held_out.txt"
    held_out.write_text(eval_text_path().read_text()[:2000])  # a few hundred tokens: the perplexities, not a benchmark
    runs = run_mlc.runs_dir
    runs.mkdir(parents=True, exist_ok=True)
    (runs / train_run_dir.name).symlink_to(train_run_dir)
    run_id = train_run_dir.name.rsplit("-", 1)[-1]
    code, out, err = run_mlc("checkpoint", "average", f"run:{run_id}", "--out", tmp_path / "avg", "--eval", held_out, "--context", "64", "--json")
    assert code == 0, err
    r = json.loads(out)
    linked = runs / train_run_dir.name
    assert len(r["inputs"]) == 2 and set(r["input_perplexities"]) == {str(step(linked, 2)), str(step(linked, 4))}
    a, b = (torch_reference_state(step(train_run_dir, n)) for n in (2, 4))
    got = safetensors_state(tmp_path / "avg")
    for name, t in got.items():
        assert torch.allclose(t, (a[f"train.model.{name}"] + b[f"train.model.{name}"]) / 2, atol=1e-7, rtol=0), name
    run_dir = next(p for p in runs.glob("*-checkpoint-*"))
    inputs = json.loads((run_dir / "run.json").read_text())["inputs"]
    assert [i["path"] for i in inputs if i["role"] == "checkpoint"] == [str(step(linked, 2)), str(step(linked, 4))]
    assert all(i["hash"].startswith("sha256:") for i in inputs)
    assert r["perplexity"] > 1 and all(v > 1 for v in r["input_perplexities"].values())


def test_ema_weights_follow_the_recurrence(tiny_hf_model, tmp_path, run_mlc):
    from safetensors.torch import save_file

    base = tiny_hf_model("llama")
    dirs = []
    for i in range(3):
        d = tmp_path / f"m{i}"
        shutil.copytree(base, d)
        state = {k: v + i for k, v in safetensors_state(base).items()}
        save_file(state, d / "model.safetensors")
        dirs.append(d)
    code, _, err = run_mlc("checkpoint", "average", *dirs, "--method", "ema", "--decay", "0.5", "--out", tmp_path / "ema")
    assert code == 0, err
    ema = safetensors_state(dirs[0])
    for d in dirs[1:]:  # the recurrence itself, by hand
        ema = {k: 0.5 * v + 0.5 * safetensors_state(d)[k] for k, v in ema.items()}
    got = safetensors_state(tmp_path / "ema")
    assert all(torch.allclose(got[k], ema[k], atol=1e-6) for k in ema)


def test_lawa_picks_the_last_k_steps_at_the_spacing_or_says_which_step_is_missing(train_run_dir, tmp_path, run_mlc):
    runs = run_mlc.runs_dir
    runs.mkdir(parents=True, exist_ok=True)
    (runs / train_run_dir.name).symlink_to(train_run_dir)
    ref = f"run:{train_run_dir.name.rsplit('-', 1)[-1]}"
    code, out, err = run_mlc("checkpoint", "average", ref, "--last", "2", "--spacing", "2", "--out", tmp_path / "lawa", "--json")
    assert code == 0, err
    linked = runs / train_run_dir.name
    assert json.loads(out)["inputs"] == [str(step(linked, 2)), str(step(linked, 4))]
    code, _, err = run_mlc("checkpoint", "average", ref, "--last", "3", "--spacing", "2", "--out", tmp_path / "lawa3")
    assert code == 1 and "no complete step 0" in err and "2, 4" in err and not (tmp_path / "lawa3").exists()
