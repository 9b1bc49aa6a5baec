"""EMA and LAWA kept in the loop: equal to the recurrences computed here by hand from the raw weights of every step,
continued bitwise by a resume from a checkpoint; in `mlc train`, each saved as its own artifact (also across a kill -9
and resume, the raw weights read from the checkpoints with torch's own DCP converter) and evaluated next to the raw
weights at every evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import DATA, metrics, mlc_train, train_runs, write_config

DECAY = 0.5


def small_model(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=5e-2)


def sgd_steps(model, opt, averages, first: int, last: int, history: list) -> None:
    """Steps first..last (1-based); each step's weights appended to history."""
    for step in range(first, last + 1):
        torch.manual_seed(100 + step)  # the same batch for a step whichever process runs it
        model(torch.randn(4, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        averages.update(step)
        history.append({n: p.detach().double().clone() for n, p in model.named_parameters()})


def test_averages_equal_the_hand_recurrences_and_resume_bitwise(tmp_path):
    from mlc.commands.train.averaging import WeightAverages
    from mlc.commands.train.config import AverageSection
    from mlc.distributed.checkpoint import CheckpointManager, TrainState

    cfg = AverageSection(ema=True, ema_decay=0.8, lawa_k=3, lawa_interval=2)
    model, opt = small_model(0)
    averages = WeightAverages(model, cfg)
    history = [{n: p.detach().double().clone() for n, p in model.named_parameters()}]
    sgd_steps(model, opt, averages, 1, 5, history)
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save(5, TrainState(model, [opt], extra={"average": averages}), {"consumed_samples": 5})
    sgd_steps(model, opt, averages, 6, 11, history)

    ema = history[0]
    for w in history[1:]:
        ema = {n: 0.8 * ema[n] + 0.2 * w[n] for n in ema}
    lawa = {n: (history[6][n] + history[8][n] + history[10][n]) / 3 for n in ema}  # copies at 2..10: the last three
    for name, expected in (("ema", ema), ("lawa", lawa)):
        got = averages.average(name)
        assert max((got[n].double() - expected[n]).abs().max().item() for n in expected) < 1e-6, name
    assert max((ema[n] - history[-1][n]).abs().max().item() for n in ema) > 1e-3  # not the raw weights

    with averages.swapped_in("lawa"):
        assert all((p.double() - lawa[n]).abs().max() < 1e-6 for n, p in model.named_parameters())
    assert all(torch.equal(p.double(), history[-1][n]) for n, p in model.named_parameters())  # put back exactly

    other, other_opt = small_model(1)  # other weights, a fresh optimizer and fresh averages
    resumed = WeightAverages(other, cfg)
    manager.load(manager.latest(), TrainState(other, [other_opt], extra={"average": resumed}))
    sgd_steps(other, other_opt, resumed, 6, 11, [])
    for name in ("ema", "lawa"):
        got, expected = resumed.average(name), averages.average(name)
        assert all(torch.equal(got[n], expected[n]) for n in expected), name


def test_resuming_with_averages_from_a_checkpoint_without_them_names_the_section(tmp_path):
    from mlc.commands.train.averaging import WeightAverages
    from mlc.commands.train.config import AverageSection
    from mlc.distributed.checkpoint import CheckpointManager, TrainState
    from mlc.errors import InputError

    model, opt = small_model(0)
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save(1, TrainState(model, [opt]), {"consumed_samples": 1})
    averages = WeightAverages(model, AverageSection(ema=True))
    with pytest.raises(InputError, match="^average: the checkpoint .* holds no average state"):
        manager.load(manager.latest(), TrainState(model, [opt], extra={"average": averages}))


def raw_weights(step_dir, tmp_path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    return {k: v.double() for k, v in torch.load(out, weights_only=False)["train"]["model"].items()}


def artifact_weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.double() for k, v in load_file(f"{path}/model.safetensors").items()}


@pytest.mark.slow
def test_ema_and_lawa_artifacts_follow_their_recurrences_across_a_resume(tmp_path):
    from mlc.models import build_model

    config, runs = write_config(tmp_path), tmp_path / "runs"
    sets = ("average.ema=true", f"average.ema_decay={DECAY}", "average.lawa_k=2", "average.lawa_interval=2",
            "checkpoint.interval=1", "checkpoint.keep_last_k=0", "eval.interval=4")
    killed = mlc_train(config, runs, *sets, env={"MLC_FAULT_KILL": "after-step:5"}, check=False)
    assert killed.returncode == -9
    mlc_train(config, runs, *sets)
    (run,) = train_runs(runs)
    record = json.loads((run / "run.json").read_text())
    assert {"model", "model-ema", "model-lawa"} <= set(record["artifacts"])

    initial = build_model(json.loads((DATA / "tiny" / "config.json").read_text()), seed=0, dtype="float32")
    weights = [{k: v.double() for k, v in initial.state_dict().items()}]
    weights += [raw_weights(run / "checkpoints" / f"step-{s:08d}", tmp_path) for s in range(1, 8)]
    weights.append(artifact_weights(record["artifacts"]["model"]["path"]))
    names = set(weights[-1])  # the saved model's tensors (the head is tied to the embeddings)
    weights = [{k: w[k] for k in names} for w in weights]
    ema = dict(weights[0])
    for w in weights[1:]:
        ema = {k: DECAY * ema[k] + (1 - DECAY) * w[k] for k in ema}
    lawa = {k: (weights[6][k] + weights[8][k]) / 2 for k in weights[8]}  # copies at steps 2, 4, 6, 8: the last two
    for name, expected in (("model-ema", ema), ("model-lawa", lawa)):
        got = artifact_weights(record["artifacts"][name]["path"])
        worst = max((got[k] - expected[k]).abs().max().item() for k in got)
        assert worst < 1e-6, (name, worst)
    assert max((ema[k] - weights[8][k]).abs().max().item() for k in ema) > 1e-4  # the averages are not the raw weights

    evals = [m for m in metrics(run) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [4, 8]
    for m in evals:
        assert {"eval_loss_ema", "eval_loss_lawa"} <= set(m) and m["eval_loss_ema"] != m["eval_loss"]
    assert record["summary"]["eval_loss_ema"] == evals[-1]["eval_loss_ema"]
