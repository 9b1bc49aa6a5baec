"""Optimised linear merges of a checkpoint pool (the Recycle paper, 2412.04144): search the weights.

A candidate is a point a of the simplex (non-negative weights summing to 1), merged as
sum_i a_i * theta_i straight into one in-memory native model (nothing is written) and scored on
every objective:
  - NAME=FILE.txt (or .jsonl of {"text": ...}): perplexity of the text, loss = mean token NLL;
  - NAME=FILE.jsonl of {"context": str, "choices": [str, ...], "answer": int}: multiple-choice
    accuracy, each choice scored by the summed log-probability of its tokens after the context;
    loss = 1 - accuracy.
The macro objective is the mean of the objectives' losses (mean token NLL is the log of the
perplexity; 1 - accuracy): what CMA-ES minimises, and what "best" means in the results.

Optimisers come from optuna (a maintained library with both samplers, trial bookkeeping, seeding
with known points, and time budgets): CMA-ES (`cmaes`, via the `cmaes` package) on the macro score, or
NSGA-II (`nsga2`) on the per-objective losses for a multi-objective search. Either way every
evaluated point, the pool members and the uniform average included, goes into the trial table, and
the Pareto front is taken over all of them.

Candidates are asked a generation at a time and scored in parallel: in local worker processes
(`workers`), or in Ray actors on a cluster or a local Ray instance (`ray`), as mergekit-evolve does;
results are told back in candidate order, so a seed gives the same search on every backend.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from mlc.errors import InputError, ValidationError


@dataclass
class Objective:
    name: str
    path: Path
    kind: str  # "perplexity" or "accuracy"
    tokens: list[int] = field(default_factory=list)
    items: list[tuple[list[int], list[list[int]], int]] = field(default_factory=list)

    def loss(self, model: Any, context: int) -> tuple[float, float]:
        """(loss to minimise, value to report): NLL and perplexity, or 1 - accuracy and accuracy."""
        if self.kind == "perplexity":
            from mlc.models.evaluate import perplexity

            ctx = min(context, model.config.max_position_embeddings)
            result = perplexity(model, self.tokens, context=ctx, stride=ctx)
            return result.nll, result.perplexity
        correct = sum(_best_choice(model, ctx_ids, choices) == answer for ctx_ids, choices, answer in self.items)
        accuracy = correct / len(self.items)
        return 1.0 - accuracy, accuracy


@torch.inference_mode()
def _best_choice(model: Any, context: list[int], choices: list[list[int]]) -> int:
    scores = []
    for choice in choices:
        ids = torch.tensor([context + choice])
        logp = F.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, len(context) :]
        scores.append(float(logp[len(context) - 1 :].gather(1, targets.unsqueeze(1)).sum()))
    return max(range(len(scores)), key=scores.__getitem__)


def parse_objectives(specs: list[str], tokenizer: Any, problems: list[str]) -> list[Objective]:
    """NAME=FILE specs read and tokenised; problems are appended, one line each."""
    objectives = []
    for spec in specs:
        name, sep, file = spec.partition("=")
        path = Path(file)
        if not sep or not name:
            problems.append(f"--objective {spec!r} is not NAME=FILE")
            continue
        if not path.is_file():
            problems.append(f"objective {name}: {path} does not exist")
            continue
        try:
            objectives.append(_read_objective(name, path, tokenizer))
        except InputError as e:
            problems.append(f"objective {name}: {e.message}")
    names = [o.name for o in objectives]
    if len(set(names)) != len(names):
        problems.append("objective names must be unique")
    return objectives


def _read_objective(name: str, path: Path, tokenizer: Any) -> Objective:
    from mlc.io.texts import read_texts
    from mlc.models.evaluate import tokenize_texts

    if path.suffix.lower() in (".jsonl", ".ndjson"):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if records and all(isinstance(r, dict) and "choices" in r for r in records):
            items = []
            for n, r in enumerate(records, 1):
                choices, answer = r.get("choices"), r.get("answer")
                if not isinstance(r.get("context"), str) or not isinstance(choices, list) or len(choices) < 2 or not isinstance(answer, int) or not 0 <= answer < len(choices):
                    raise InputError(f"{path}:{n} needs context (text), choices (2+ texts) and answer (an index into choices)")
                items.append((tokenizer.encode(r["context"]), [tokenizer.encode(c, add_special_tokens=False) for c in choices], answer))
            return Objective(name, path, "accuracy", items=items)
    tokens = tokenize_texts(tokenizer, read_texts(path))
    if len(tokens) < 2:
        raise InputError(f"{path} has fewer than 2 tokens")
    return Objective(name, path, "perplexity", tokens=tokens)


class Pool:
    """The pool's weights in memory, merged on demand into one native model."""

    def __init__(self, paths: list[Path]):
        from mlc.io.safetensors_reader import ModelTensors
        from mlc.models import load_model

        self.paths = paths
        self.model = load_model(paths[0], dtype=torch.float32)
        self.params = dict(self.model.named_parameters())  # a tied head appears once
        self.states = []
        for p in paths:
            with ModelTensors(p) as tensors:
                self.states.append({n: tensors.read(n, torch.float32) for n in self.params})

    @torch.no_grad()
    def set_weights(self, weights: list[float]) -> None:
        for name, param in self.params.items():
            param.zero_()
            for w, state in zip(weights, self.states):
                if w:
                    param.add_(state[name], alpha=w)


class Evaluator:
    """Scores candidate weights on every objective: in this process, a worker process or a Ray actor."""

    def __init__(self, paths: list[Path], objectives: list[Objective], context: int, threads: int | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        self.pool = Pool(paths)
        self.objectives = objectives
        self.context = context

    def evaluate(self, weights: list[float]) -> tuple[dict[str, float], dict[str, float]]:
        """(loss, reported value) per objective for the merge with these weights."""
        self.pool.set_weights(weights)
        losses, values = {}, {}
        for o in self.objectives:
            losses[o.name], values[o.name] = o.loss(self.pool.model, self.context)
        return losses, values


_worker: Evaluator | None = None  # a worker process's evaluator, built once by _start_worker


def _start_worker(paths: list[Path], objectives: list[Objective], context: int, threads: int) -> None:
    global _worker
    _worker = Evaluator(paths, objectives, context, threads)


def _evaluate_in_worker(weights: list[float]) -> tuple[dict[str, float], dict[str, float]]:
    assert _worker is not None
    return _worker.evaluate(weights)


Batch = Callable[[list[list[float]]], list[tuple[dict[str, float], dict[str, float]]]]


@contextmanager
def evaluators(paths: list[Path], objectives: list[Objective], context: int, workers: int = 1, ray: str | None = None) -> Iterator[Batch]:
    """A function scoring a batch of candidates, results in candidate order: here (workers=1), in `workers`
    local processes (each with its own copy of the pool), or in `workers` Ray actors (ray: an address,
    or "local" for a Ray instance on this machine; workers=0 means one per CPU of the cluster)."""
    if ray is not None:
        from mlc.distributed.ray import actor_pool, cluster_cpus, ray_session

        with ray_session(ray):
            actors = actor_pool(Evaluator, (paths, objectives, context, 1), actors=workers or cluster_cpus())
            yield lambda batch: list(actors.map(lambda actor, w: actor.evaluate.remote(w), batch))
        return
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // workers)
        spawn = multiprocessing.get_context("spawn")  # never fork a process that has started torch's threads
        with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_start_worker, initargs=(paths, objectives, context, threads)) as ex:
            yield lambda batch: list(ex.map(_evaluate_in_worker, batch))
        return
    here = Evaluator(paths, objectives, context)
    yield lambda batch: [here.evaluate(w) for w in batch]


def normalised(weights: list[float]) -> list[float]:
    total = sum(max(0.0, w) for w in weights)
    return [max(0.0, w) / total for w in weights] if total > 0 else [1.0 / len(weights)] * len(weights)


def pareto_front(points: list[list[float]]) -> list[int]:
    """Indices of the points no other point dominates (all losses <=, one <)."""
    front = []
    for i, p in enumerate(points):
        dominated = any(all(q[k] <= p[k] for k in range(len(p))) and any(q[k] < p[k] for k in range(len(p))) for j, q in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


@dataclass
class SearchResult:
    trials: list[dict[str, Any]]
    front: list[int]
    best: int
    objectives: list[str]


def time_it() -> Callable[[], float]:
    """Seconds since this call, as a function (the search checks its time budget between rounds)."""
    start = time.monotonic()
    return lambda: time.monotonic() - start


def population(optimizer: str, n: int, trials: int) -> int:
    """Candidates asked per round: CMA-ES's default population (4 + 3 ln n), NSGA-II's population.

    Rounds are scored in parallel and told to the optimiser in candidate order, so the size of a round,
    never the number of workers, shapes the search: the same seed gives the same trials on any backend.
    """
    if optimizer == "cmaes":
        return 4 + int(3 * math.log(n))
    return max(4, min(16, trials // 3))


def search(
    paths: list[Path],
    objectives: list[Objective],
    optimizer: str = "cmaes",
    trials: int = 40,
    time_budget: float | None = None,
    seed: int = 0,
    context: int = 256,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    workers: int = 1,
    ray: str | None = None,
) -> SearchResult:
    """Evaluate the pool members and their uniform average, then search in rounds; return every trial and the front."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n = len(paths)
    table: list[dict[str, Any]] = []
    elapsed = time_it()
    size = population(optimizer, n, trials)
    if optimizer == "cmaes":
        sampler = optuna.samplers.CmaEsSampler(seed=seed, x0={f"w{i}": 0.5 for i in range(n)}, sigma0=0.25, popsize=size)
        study = optuna.create_study(direction="minimize", sampler=sampler)
    else:
        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=size)
        study = optuna.create_study(directions=["minimize"] * len(objectives), sampler=sampler)
    study.enqueue_trial({f"w{i}": 0.5 for i in range(n)})  # start from the uniform average

    with evaluators(paths, objectives, context, workers, ray) as run_batch:

        def record(candidates: list[list[float]], kinds: list[str]) -> list[dict[str, Any]]:
            rows = []
            for weights, kind, (losses, values) in zip(candidates, kinds, run_batch(candidates)):
                row = {"trial": len(table), "kind": kind, "weights": [round(w, 6) for w in weights], "losses": losses, "values": values}
                row["macro"] = sum(losses.values()) / len(losses)
                table.append(row)
                rows.append(row)
                if on_trial is not None:
                    on_trial(row)
            return rows

        members = [[1.0 if j == i else 0.0 for j in range(n)] for i in range(n)]
        record(members + [[1.0 / n] * n], [f"pool:{p.name}" for p in paths] + ["uniform"])
        done = 0
        while done < trials and (time_budget is None or elapsed() < time_budget):
            asked = [study.ask() for _ in range(min(size, trials - done))]
            candidates = [normalised([t.suggest_float(f"w{i}", 0.0, 1.0) for i in range(n)]) for t in asked]
            for t, row in zip(asked, record(candidates, ["search"] * len(asked))):
                study.tell(t, row["macro"] if optimizer == "cmaes" else [row["losses"][o.name] for o in objectives])
            done += len(asked)
    front = pareto_front([[r["losses"][o.name] for o in objectives] for r in table])
    best = min(range(len(table)), key=lambda i: table[i]["macro"])
    return SearchResult(table, front, best, [o.name for o in objectives])


def plot(result: SearchResult, objectives: list[Objective], path: Path) -> None:
    """Scatter of the first two objectives' values: every trial, the front, the pool members, the best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result.objectives[:2] if len(result.objectives) > 1 else result.objectives * 2
    xs = [r["values"][names[0]] for r in result.trials]
    ys = [r["values"][names[1]] for r in result.trials]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    ax.scatter(xs, ys, s=12, c="#bbbbbb", label="trials")
    front = sorted(result.front, key=lambda i: xs[i])
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "o-", c="#d62728", ms=5, label="Pareto front")
    for i, r in enumerate(result.trials):
        if r["kind"].startswith("pool:") or r["kind"] == "uniform":
            ax.annotate(r["kind"].removeprefix("pool:"), (xs[i], ys[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.scatter([xs[i]], [ys[i]], s=24, c="#1f77b4", marker="s")
    ax.scatter([xs[result.best]], [ys[result.best]], s=80, c="#2ca02c", marker="*", label="best (macro loss)", zorder=5)
    kinds = {o.name: o.kind for o in objectives}
    ax.set_xlabel(f"{names[0]} ({kinds[names[0]]})")
    ax.set_ylabel(f"{names[1]} ({kinds[names[1]]})")
    ax.set_title("merge search: every evaluated merge")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def check_pool(paths: list[Path], runs_root: Path) -> None:
    """The pool must merge linearly (same architecture, shapes and tokenizer): validated without reading weights."""
    from mlc.commands.merge.api import plan_merge

    if len(paths) < 2:
        raise ValidationError(["a search needs at least two pool models"], what="merge search")
    plan_merge({"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths]}, runs_root).close()


def macro_summary(result: SearchResult) -> dict[str, Any]:
    best = result.trials[result.best]
    uniform = next(r for r in result.trials if r["kind"] == "uniform")
    pool = [r for r in result.trials if r["kind"].startswith("pool:")]
    return {
        "best_macro_loss": best["macro"],
        "uniform_macro_loss": uniform["macro"],
        "best_pool_macro_loss": min(r["macro"] for r in pool),
        "best_weights": best["weights"],
        "best_values": best["values"],
        "trials": len(result.trials),
        "front": len(result.front),
        "nan": any(math.isnan(v) for r in result.trials for v in r["losses"].values()),
    }
