"""Tensor parallelism (train.parallel = "tp"): what it refuses, and 2-D FSDP x TP on 4 real gloo processes against
one process (loss curve, samples, checkpoints, exported model, resume after a kill)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from .conftest import DATA, mlc_train, segments, train_runs, write_config

# 2 TP groups of 2 against one process: the o/down outputs and the attention/MLP input gradients are summed by
# all-reduce, and the gradients averaged over 2 FSDP shards, in another order than one process's. Measured: 4.8e-7
# (one ulp at 7.x) on 4 of the 8 steps, 0 on the others; the bound leaves room for other BLAS kernels.
PARITY_TOL = 1e-5
# Weights: AdamW divides each gradient by the root of its second moment, so an element whose gradient is near zero
# (a sum that almost cancels) turns a rounding difference into a step of up to lr (3e-3). Measured after 6 steps: mean
# |difference| per tensor 3e-8 to 1.0e-7, a handful of elements (of 1M) above 1e-5, the largest 1.1e-4. A wrong split
# (heads dealt to the wrong process, a missing all-reduce) moves the mean by orders of magnitude.
WEIGHT_MEAN_TOL = 1e-6
WEIGHT_MAX_TOL = 1e-3


# ---- what tensor parallelism refuses, before any process starts ---------------------------------------------------
TINY = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
)
CORPUS = DATA / "corpus" / "train.txt"


def write(tmp_path: Path, body: str, model: dict = TINY) -> Path:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text(json.dumps(model))
    path = tmp_path / "run.toml"
    path.write_text(f'[model]\nconfig = "model"\n[data]\ntrain = "{CORPUS}"\n' + body)
    return path


@pytest.mark.parametrize(
    "sets, words",
    [
        (['train.parallel="tp"', "lora.enabled=true", 'model.init="x"'], 'lora.enabled: LoRA and QLoRA are not supported with train.parallel = "tp"'),
        (['train.parallel="tp"', 'optim.name="muon"'], "optim.name: muon needs each weight matrix whole"),
        (['train.parallel="tp"', 'optim.name="galore"'], "optim.name: galore needs each weight matrix whole"),
        (['train.parallel="tp"', "average.ema=true"], "average.ema / average.lawa_k: weight averages are not kept"),
        (["train.tp_size=2"], 'train.tp_size: applies only to train.parallel = "tp" (it is "ddp")'),
    ],
)
def test_tp_refuses_what_it_cannot_split_naming_the_key(tmp_path, run_mlc, sets, words):
    path = write(tmp_path, "")
    code, _, err = run_mlc("train", path, *[a for s in sets for a in ("--set", s)])
    assert code == 1 and words in err, err
    assert not run_mlc.runs_dir.exists() or not any(run_mlc.runs_dir.iterdir())


@pytest.mark.parametrize(
    "nproc, sets, model, words",
    [
        # 2 key/value heads cannot be dealt to 4 processes: checked before any process starts.
        (4, [], TINY, "train.tp_size: the model's num_key_value_heads (2) is not divisible by 4 processes per group"),
        (4, ["train.tp_size=4"], {**TINY, "num_key_value_heads": 4, "intermediate_size": 50}, "intermediate_size (50) is not divisible by 4"),
        (6, ["train.tp_size=4"], TINY, "train.tp_size: 6 processes cannot form groups of 4"),
        (4, ["train.tp_size=2", "train.batch_size=6", "train.micro_batch_size=2"], TINY,
         "train.batch_size: 6 sequences cannot be split into micro-batches of 2 over 2 tensor-parallel groups of 2"),
        (2, [], {**TINY, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 4},
         "tensor parallelism covers dense models; this one has experts"),
    ],
)
def test_tp_that_cannot_split_the_model_fails_before_launching(tmp_path, run_mlc, nproc, sets, model, words):
    path = write(tmp_path, '[train]\nparallel = "tp"\n', model)
    code, _, err = run_mlc("train", path, *[a for s in sets for a in ("--set", s)], "--nproc-per-node", str(nproc))
    assert code == 1 and words in err, err
    assert not run_mlc.runs_dir.exists() or not any(run_mlc.runs_dir.iterdir())


# ---- 2-D FSDP x TP on 4 processes ----------------------------------------------------------------------------------
def samples_by_rank(trace: Path) -> dict[int, dict[int, list[int]]]:
    """rank -> step -> samples read, all micro-batches together (a trace holds one execution of each step)."""
    out: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for line in trace.read_text().splitlines():
        rec = json.loads(line)
        out[rec["rank"]][rec["step"]] += rec["samples"]
    return out


def model_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_close_weights(a: dict, b: dict) -> None:
    for k in a:
        diff = (a[k] - b[k]).abs()
        assert diff.mean().item() <= WEIGHT_MEAN_TOL and diff.max().item() <= WEIGHT_MAX_TOL, (k, diff.mean().item(), diff.max().item())


@pytest.mark.slow
def test_fsdp_by_tp_on_four_processes_matches_one_process_and_resumes_after_a_kill(one_process_run, tmp_path, run_mlc):
    """4 processes as 2 FSDP shards x 2 TP groups (train.tp_size = 2): SIGKILL after step 5, resumed from the step-4
    checkpoint to the end. Every step's loss, the checkpoint's weights and the exported model match the one-process
    run; the two processes of a TP group read the same samples, the two groups the halves of each batch."""
    import torch

    from mlc.io.checkpoints.dcp import DCPReader

    config, runs = write_config(tmp_path), tmp_path / "runs"
    traces = [tmp_path / "trace0.jsonl", tmp_path / "trace1.jsonl"]
    sets = ('train.parallel="tp"', "train.tp_size=2")
    first = mlc_train(config, runs, *sets, nproc=4, env={"MLC_FAULT_KILL": "after-step:5", "MLC_TRAIN_TRACE_SAMPLES": str(traces[0])}, check=False)
    assert first.returncode != 0
    mlc_train(config, runs, *sets, nproc=4, env={"MLC_TRAIN_TRACE_SAMPLES": str(traces[1])})

    one, (tp,) = one_process_run["run"], train_runs(runs)
    ref = one_process_run["curve"]
    seg1, seg2 = segments(tp)
    assert sorted(seg1) == [1, 2, 3, 4, 5] and sorted(seg2) == [5, 6, 7, 8]
    assert seg2[5] == seg1[5]  # the step after the checkpoint, recomputed: the same float
    worst = max(abs(seg[s] - ref[s]) for seg in (seg1, seg2) for s in seg)
    assert worst <= PARITY_TOL, f"max |loss difference| {worst:.2e}"

    # Data: ranks 0,1 form TP group 0 and ranks 2,3 group 1; each group reads one micro-batch of 4 per step.
    expected = samples_by_rank(one_process_run["trace"])[0]
    for trace in traces:
        read = samples_by_rank(trace)
        for step in read[0]:
            assert read[0][step] == read[1][step] and read[2][step] == read[3][step]
            assert sorted(read[0][step] + read[2][step]) == sorted(expected[step])

    # The checkpoint of step 6 (written after the resume) and the exported model hold the one-process weights.
    def step6(run: Path) -> dict:
        reader = DCPReader(run / "checkpoints" / "step-00000006")
        return {k: reader.read_key(k) for k in reader.tensor_meta if k.startswith("train.model.")}

    code, _, err = run_mlc("checkpoint", "verify", tp / "checkpoints" / "step-00000006")
    assert code == 0, err
    a, b = step6(one), step6(tp)
    assert set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)
    assert_close_weights(a, b)
    summary = {r: json.loads((r / "run.json").read_text())["summary"] for r in (one, tp)}
    a, b = model_tensors(Path(summary[one]["artifact"])), model_tensors(Path(summary[tp]["artifact"]))
    assert set(a) == set(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype == torch.float32 for k in a)
    assert_close_weights(a, b)
    assert abs(summary[tp]["eval_loss"] - summary[one]["eval_loss"]) <= PARITY_TOL
