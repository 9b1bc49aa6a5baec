"""`mlc merge search` on a pool whose answer is knowable: a base pre-trained a little on two synthetic
tasks (A: x(k) -> x(k+1), B: x(k) -> x(k+5), each sequence prefixed by its task letter), fine-tuned on
each alone with an intermediate checkpoint, plus a checkpoint tuned on an unrelated task C that hurts
both. The specialists forget the other task, and C drags the uniform average down: the searched mix
must beat every single checkpoint and the uniform average on the macro loss (mean NLL over A and B),
and the Pareto front must hold the specialists' trade-offs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from .tiny import write_wordlevel_tokenizer

VOCAB = ["A", "B", "C"] + [f"x{i}" for i in range(12)]
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(VOCAB), "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 64, "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "torch_dtype": "float32",
}


STEP = {"a": 1, "b": 5, "c": 7}


def task_text(task: str, n: int, seed: int) -> str:
    """Lines of 'A x3 x4 x5 ...' (task a: +1 mod 12; b: +5; c: +7), 12 numbers each."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = rng.randrange(12)
        lines.append(task.upper() + " " + " ".join(f"x{(k + STEP[task] * j) % 12}" for j in range(12)))
    return "\n".join(lines)


def ids(text: str) -> torch.Tensor:
    index = {t: i for i, t in enumerate(VOCAB)}
    return torch.tensor([[index[t] for t in line.split()] for line in text.splitlines()])


def train(model, data: torch.Tensor, steps: int, seed: int, lr: float = 3e-3) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, data.shape[0], (16,), generator=g)]
        logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> tuple[Path, list[Path]]:
    from mlc.models import build_model, save_model

    root = tmp_path_factory.mktemp("pool")
    torch.manual_seed(0)
    a, b = ids(task_text("a", 200, 1)), ids(task_text("b", 200, 2))
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead (and spin on a busy machine)
    model = build_model(CONFIG, seed=0)
    train(model, torch.cat([a, b]), 30, seed=0)  # a little of both: the shared base

    def save(name: str, m) -> Path:
        path = save_model(m, root / name)
        write_wordlevel_tokenizer(path, VOCAB)
        return path

    paths = [save("base", model)]
    for task, stages in (("a", (("early", 15), ("final", 35))), ("b", (("early", 15), ("final", 35))), ("c", (("final", 50),))):
        tuned = build_model(CONFIG, seed=0)
        tuned.load_state_dict(model.state_dict())
        for stage, steps in stages:
            train(tuned, ids(task_text(task, 200, 3 + len(paths))) if task == "c" else {"a": a, "b": b}[task], steps, seed=3)
            paths.append(save(f"{task}-{stage}", tuned))
    (root / "task_a.txt").write_text(task_text("a", 20, 11))
    (root / "task_b.txt").write_text(task_text("b", 20, 12))
    return root, paths


def test_search_beats_uniform_and_every_checkpoint_and_the_front_holds_the_specialists(run_mlc, pool):
    root, paths = pool
    out = root / "best"
    code, stdout, err = run_mlc(
        "--json", "merge", "search", *paths, "--objective", f"A={root / 'task_a.txt'}", "--objective", f"B={root / 'task_b.txt'}",
        "--out", out, "--trials", "30", "--seed", "0",
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["best_macro_loss"] < summary["best_pool_macro_loss"] - 0.1
    assert summary["best_macro_loss"] < summary["uniform_macro_loss"] - 0.1
    search_dir = Path(summary["search_dir"])
    trials = json.loads((search_dir / "trials.json").read_text())
    front = json.loads((search_dir / "pareto.json").read_text())["front"]
    assert (search_dir / "pareto.png").stat().st_size > 10_000
    # The specialists are the best single checkpoints per task; the front reaches (or beats) each of them.
    for task in ("A", "B"):
        best_single = min(t["losses"][task] for t in trials if t["kind"].startswith("pool:"))
        assert min(t["losses"][task] for t in front) <= best_single
    kinds = {t["kind"] for t in front}
    assert "search" in kinds  # and it holds mixtures that trade between them
    # The best merge is the one written, and it scores as recorded when evaluated from disk.
    from mlc.models import load_model
    from mlc.models.evaluate import perplexity
    from mlc.models.tokenizer import load_tokenizer

    model = load_model(out)
    tok = load_tokenizer(out)
    best = min(trials, key=lambda t: t["macro"])
    got = perplexity(model, tok.encode((root / "task_a.txt").read_text()), context=64, stride=64).perplexity
    assert got == pytest.approx(best["values"]["A"], rel=1e-4)
    weights = best["weights"]
    assert abs(sum(weights) - 1) < 1e-5 and min(weights) >= 0
    # The merge is recorded: each pool member is an input of the run, the model its artifact.
    code, stdout, _ = run_mlc("--json", "runs", "lineage", str(out))
    assert code == 0 and all(p.name in stdout for p in paths)


def test_multiple_choice_objective_and_time_budget(run_mlc, pool, tmp_path):
    root, paths = pool
    items = []
    rng = random.Random(5)
    for _ in range(12):
        k = rng.randrange(12)
        context = "A " + " ".join(f"x{(k + j) % 12}" for j in range(6))
        right, wrong = f"x{(k + 6) % 12}", f"x{(k + 9) % 12}"
        answer = rng.randrange(2)
        items.append({"context": context, "choices": [right, wrong] if answer == 0 else [wrong, right], "answer": answer})
    mc = tmp_path / "a_mc.jsonl"
    mc.write_text("\n".join(json.dumps(i) for i in items))
    code, stdout, err = run_mlc(
        "--json", "merge", "search", paths[0], paths[2], "--objective", f"mc={mc}", "--objective", f"B={root / 'task_b.txt'}",
        "--optimizer", "nsga2", "--trials", "500", "--time-budget", "2", "--out", tmp_path / "m",
    )
    assert code == 0, err
    trials = json.loads((Path(json.loads(stdout)["search_dir"]) / "trials.json").read_text())
    assert len(trials) < 500  # the time budget stopped the search
    a_final = next(t for t in trials if t["kind"] == "pool:a-final")
    assert a_final["values"]["mc"] == 1.0  # the task-a specialist answers every task-a question


def test_search_validates_everything_first(run_mlc, pool, tmp_path):
    root, paths = pool
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "A x1", "choices": ["x2"], "answer": 3}) + "\n")
    code, _, err = run_mlc("merge", "search", paths[0], tmp_path / "nowhere", "--objective", f"x={bad}", "--objective", "nofile", "--optimizer", "sgd", "--out", tmp_path / "o")
    assert code == 1
    assert "nowhere does not exist" in err and "--optimizer 'sgd'" in err
    code, _, err = run_mlc("merge", "search", paths[0], paths[1], "--objective", f"x={bad}", "--objective", "nofile", "--out", tmp_path / "o")
    assert code == 1 and "needs context (text), choices (2+ texts)" in err and "'nofile' is not NAME=FILE" in err


@pytest.mark.slow
def test_the_same_seed_gives_the_same_search_in_parallel_processes_and_on_ray(pool):
    from mlc.commands.merge import search as S
    from mlc.models.tokenizer import load_tokenizer

    root, paths = pool
    problems: list[str] = []
    objectives = S.parse_objectives([f"A={root / 'task_a.txt'}", f"B={root / 'task_b.txt'}"], load_tokenizer(paths[0]), problems)
    assert not problems
    run = dict(objectives=objectives, trials=9, seed=3, context=64)  # two rounds: CMA-ES's 7 candidates (4 + 3 ln 3), then 2
    serial = S.search(paths[:3], **run)
    assert len(serial.trials) == 3 + 1 + 9
    assert S.search(paths[:3], **run, workers=2).trials == serial.trials
    assert S.search(paths[:3], **{**run, "seed": 4}).trials != serial.trials
    # Ray is in the dev extra: a real local Ray instance, two actors.
    assert S.search(paths[:3], **run, workers=2, ray="local").trials == serial.trials


def test_ray_asked_for_without_ray_installed_is_one_line(run_mlc, pool, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    root, paths = pool
    code, _, err = run_mlc("merge", "search", paths[0], paths[1], "--objective", f"A={root / 'task_a.txt'}", "--ray", "local", "--out", tmp_path / "o")
    assert code == 1 and "Ray is not installed" in err and "pip install 'mlc[ray]'" in err and "Traceback" not in err
