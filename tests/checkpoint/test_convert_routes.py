"""`mlc checkpoint convert` between dcp, hf, torch, universal and gguf: tensors and logits against independent readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.checkpoint.conftest import hf_logits, read_json, safetensors_state, torch_reference_state

IDS = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(0))


def step(run_dir: Path, n: int) -> Path:
    return run_dir / "checkpoints" / f"step-{n:08d}"


def short_id(run_dir: Path) -> str:
    return run_dir.name.rsplit("-", 1)[-1]


def test_a_train_step_converts_to_hf_holding_what_torchs_own_dcp_reader_reads(train_run_dir, tmp_path, run_mlc):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    code, stdout, err = run_mlc("checkpoint", "convert", step(train_run_dir, 4), "--to", "hf", "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["from"] == "dcp"
    reference = {k.removeprefix("train.model."): v for k, v in torch_reference_state(step(train_run_dir, 4)).items() if k.startswith("train.model.")}
    written = safetensors_state(out)
    # The tiny model ties its embeddings: the HF directory leaves lm_head out, as transformers does.
    assert set(written) == set(reference) - {"lm_head.weight"}
    for name, t in written.items():
        assert torch.equal(t, reference[name]), name
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(out.parent / "hf", dtype=torch.float32)
    expected = AutoModelForCausalLM.from_config(model.config)
    expected.load_state_dict(reference, strict=False)
    expected.tie_weights()
    with torch.no_grad():
        assert torch.equal(model.eval()(IDS).logits, expected.eval()(IDS).logits)


@pytest.mark.parametrize("ref,expected_step", [("run:{id}", 4), ("{run}", 4), ("run:{id}@step-2", 2), ("run:{id}@2", 2)])
def test_a_run_reference_means_its_latest_complete_step_or_the_named_one(train_run_dir, tmp_path, run_mlc, ref, expected_step):
    runs = run_mlc.runs_dir
    runs.mkdir(parents=True, exist_ok=True)
    link = runs / train_run_dir.name
    if not link.exists():
        link.symlink_to(train_run_dir)
    src = ref.format(id=short_id(train_run_dir), run=train_run_dir)
    code, stdout, err = run_mlc("checkpoint", "convert", src, "--to", "hf", "--out", tmp_path / "hf", "--json")
    assert code == 0, err
    converted = safetensors_state(tmp_path / "hf")["model.norm.weight"]
    reference = torch_reference_state(step(train_run_dir, expected_step))["train.model.model.norm.weight"]
    assert torch.equal(converted, reference)


def test_a_step_the_run_does_not_hold_is_refused_listing_the_steps_it_does(train_run_dir, tmp_path, run_mlc):
    run_mlc.runs_dir.mkdir(parents=True, exist_ok=True)
    (run_mlc.runs_dir / train_run_dir.name).symlink_to(train_run_dir)
    code, _, err = run_mlc("checkpoint", "convert", f"run:{short_id(train_run_dir)}@step-3", "--to", "hf", "--out", tmp_path / "hf")
    assert code == 1 and "no complete checkpoint at step 3" in err and "2, 4" in err
    assert not (tmp_path / "hf").exists()


def test_optimizer_state_survives_dcp_to_universal_to_dcp_exactly(train_run_dir, tmp_path, run_mlc):
    src = step(train_run_dir, 4)
    code, _, err = run_mlc("checkpoint", "convert", src, "--to", "universal", "--out", tmp_path / "uni", "--with-optimizer")
    assert code == 0, err
    index = read_json(tmp_path / "uni" / "universal.json")
    assert set(index["params"]["model.norm.weight"]["optimizer"]) == {"exp_avg", "exp_avg_sq", "step"}
    code, _, err = run_mlc("checkpoint", "convert", tmp_path / "uni", "--to", "dcp", "--out", tmp_path / "dcp", "--with-optimizer")
    assert code == 0, err
    before = {k: v for k, v in torch_reference_state(src).items() if k.startswith(("train.model.", "train.optim.state."))}
    after = torch_reference_state(tmp_path / "dcp")
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_model_only_is_the_default_and_asking_for_optimizer_state_a_source_lacks_fails(tiny_hf_model, train_run_dir, tmp_path, run_mlc):
    code, _, err = run_mlc("checkpoint", "convert", step(train_run_dir, 2), "--to", "universal", "--out", tmp_path / "uni")
    assert code == 0, err
    assert read_json(tmp_path / "uni" / "universal.json")["params"]["model.norm.weight"]["optimizer"] == {}
    code, _, err = run_mlc("checkpoint", "convert", tiny_hf_model("llama"), "--to", "dcp", "--out", tmp_path / "d", "--with-optimizer")
    assert code == 2 and "holds no optimizer state" in err


@pytest.mark.parametrize("via", ["torch", "universal", "dcp"])
def test_an_hf_model_round_trips_through_each_format_bit_for_bit(via, tiny_hf_model, tmp_path, run_mlc):
    src = tiny_hf_model("llama")
    code, _, err = run_mlc("checkpoint", "convert", src, "--to", via, "--out", tmp_path / via)
    assert code == 0, err
    code, _, err = run_mlc("checkpoint", "convert", tmp_path / via, "--to", "hf", "--out", tmp_path / "back")
    assert code == 0, err
    before, after = safetensors_state(src), safetensors_state(tmp_path / "back")
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    ids = IDS % 128
    assert torch.equal(hf_logits(src, ids), hf_logits(tmp_path / "back", ids))


def test_dcp_written_by_convert_loads_with_dcp_load_into_a_model(tiny_hf_model, tmp_path, run_mlc):
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    src = tiny_hf_model("qwen2")
    code, _, err = run_mlc("checkpoint", "convert", src, "--to", "dcp", "--out", tmp_path / "dcp")
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(src)
    state = {f"train.model.{k}": torch.zeros_like(v) for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    for k, v in model.state_dict().items():
        assert torch.equal(state[f"train.model.{k}"], v), k
    assert (tmp_path / "dcp" / "COMPLETE").is_file()


def test_max_shard_size_writes_shards_and_an_index_that_transformers_loads(tiny_hf_model, tmp_path, run_mlc):
    src = tiny_hf_model("llama")
    code, _, err = run_mlc("checkpoint", "convert", src, "--to", "hf", "--out", tmp_path / "hf", "--max-shard-size", "100KB", "--dtype", "bf16")
    assert code == 0, err
    index = read_json(tmp_path / "hf" / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "hf" / s).stat().st_size <= 100_000 + 50_000 for s in shards)
    assert read_json(tmp_path / "hf" / "config.json")["torch_dtype"] == "bfloat16"
    ids = IDS % 128
    expected = hf_logits(src, ids)
    got = hf_logits(tmp_path / "hf", ids)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()  # bf16 weights


def test_a_torch_file_that_needs_pickled_code_is_refused_not_run(tmp_path, run_mlc):
    import argparse

    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "megatron.pt")
    code, _, err = run_mlc("checkpoint", "convert", tmp_path / "megatron.pt", "--to", "hf", "--out", tmp_path / "out")
    assert code == 1
    assert "argparse.Namespace" in err and "weights_only=True" in err and err.strip().splitlines()[-1].startswith("error:")
    assert not (tmp_path / "out").exists()


def test_a_torch_state_dict_with_a_given_config_converts_to_hf(tiny_hf_model, tmp_path, run_mlc):
    src = tiny_hf_model("llama")
    state = safetensors_state(src)
    torch.save({"state_dict": state}, tmp_path / "weights.pt")
    code, _, err = run_mlc("checkpoint", "convert", tmp_path / "weights.pt", "--to", "hf", "--out", tmp_path / "hf", "--config", src)
    assert code == 0, err
    after = safetensors_state(tmp_path / "hf")
    assert all(torch.equal(after[k], v) for k, v in state.items())
    code, _, err = run_mlc("checkpoint", "convert", tmp_path / "weights.pt", "--to", "hf", "--out", tmp_path / "hf2")
    assert code == 1 and "--config" in err


@pytest.mark.slow
def test_a_step_saved_by_two_fsdp_processes_is_stitched_whole(tmp_path_factory, tmp_path, run_mlc):
    from tests.checkpoint.conftest import train_run

    run_dir = train_run(tmp_path_factory.mktemp("fsdp"), nproc=2, parallel="fsdp")
    src = step(run_dir, 4)
    code, out, err = run_mlc("checkpoint", "inspect", src, "--json")
    assert code == 0 and json.loads(out)["world_size"] == 2
    code, _, err = run_mlc("checkpoint", "convert", src, "--to", "universal", "--out", tmp_path / "uni", "--with-optimizer")
    assert code == 0, err
    code, _, err = run_mlc("checkpoint", "convert", tmp_path / "uni", "--to", "hf", "--out", tmp_path / "hf")
    assert code == 0, err
    reference = torch_reference_state(src)
    written = safetensors_state(tmp_path / "hf")
    assert written and all(torch.equal(t, reference[f"train.model.{n}"]) for n, t in written.items())
    from safetensors.torch import load_file

    norm = load_file(tmp_path / "uni" / "params" / "model.layers.0.mlp.up_proj.weight.safetensors")
    assert torch.equal(norm["exp_avg_sq"], reference["train.optim.state.model.layers.0.mlp.up_proj.weight.exp_avg_sq"])


@pytest.mark.slow
@pytest.mark.realmodel
def test_smollm2_goes_through_dcp_and_universal_back_to_hf_bit_for_bit(smollm2_dir, tmp_path, run_mlc):
    chain = [("dcp", []), ("universal", []), ("hf", [])]
    src = smollm2_dir
    for fmt, extra in chain:
        out = tmp_path / fmt
        code, _, err = run_mlc("checkpoint", "convert", src, "--to", fmt, "--out", out, *extra)
        assert code == 0, (fmt, err)
        src = out
    before, after = safetensors_state(smollm2_dir), safetensors_state(src)
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert (src / "tokenizer.json").read_bytes() == (smollm2_dir / "tokenizer.json").read_bytes()
    assert read_json(src / "tokenizer_config.json")["chat_template"] == read_json(smollm2_dir / "tokenizer_config.json")["chat_template"]
