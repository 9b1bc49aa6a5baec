"""The upcycling itself: stream the dense tensors into the MoE layout, one tensor at a time.

Each dense tensor is read once per model it comes from and written to every output tensor derived
from it (E experts, the shared expert) before the next is read, so memory holds a few tensors at a
time whatever E is. Output goes through ShardedWriter, whose headers are planned up front.

    run_upcycle(opts)          validate, open a run, write the artifact with its lineage; returns a summary
    write_upcycled(plan, dir)  just the tensors and files of the output directory (no run)
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from mlc.commands.upcycle.drop import drop_upcycle, dropped_neurons
from mlc.commands.upcycle.layout import OutTensor
from mlc.commands.upcycle.options import UpcycleOptions
from mlc.commands.upcycle.router import cheap_embed_routers, hidden_routers, random_router, softmax_topk_scale
from mlc.commands.upcycle.validate import UpcyclePlan, validate
from mlc.rng import keyed_generator

BASE, MERGED = 0, -1  # reader keys: 0 the base, i + 1 the i-th expert source, -1 the merge of base and sources


@dataclass
class UpcycleResult:
    out: Path
    run_id: str | None
    layout: str
    experts: int
    top_k: int
    tensors: int
    bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def run_upcycle(opts: UpcycleOptions, runs_root: Path | None = None) -> UpcycleResult:
    """Validate everything, then upcycle inside a run whose artifact records its sources and options."""
    from mlc import options
    from mlc.runs import open_run

    root = Path(runs_root) if runs_root is not None else options.get().runs_dir
    plan = validate(opts, root)  # raises before anything (even the run directory) exists
    with open_run("upcycle", config=opts.to_dict(), runs_root=root) as run:
        run.add_input(opts.base, role="base")
        for ref in opts.expert_sources:
            run.add_input(ref, role="expert-source")
        if opts.expert_prompts is not None:
            run.add_input(opts.expert_prompts, role="expert-prompts")
        meta = {
            "upcycle": opts.to_dict(),
            "layout": plan.config["architectures"][0],
            "experts_from": _expert_origins(plan),
            "shared_merge": {"method": opts.shared_merge, "params": plan.merge_params} if opts.shared_merge else None,
        }
        with run.artifact("model", kind="model", out=opts.out, overwrite=opts.overwrite, meta=meta) as staging:
            started = time.perf_counter()
            written = write_upcycled(plan, staging, log=run.log)
            seconds = time.perf_counter() - started
        out = Path(run.data["artifacts"]["model"]["path"])
        result = UpcycleResult(out, run.id, meta["layout"], opts.experts, opts.top_k, len(plan.tensors), written, round(seconds, 3))
        run.set_summary(**result.to_dict())
    return result


def _expert_origins(plan: UpcyclePlan) -> list[str]:
    """Which model each expert copies, for the lineage record."""
    refs = plan.opts.expert_sources
    return [refs[i] if (i := plan.expert_source(e)) is not None else plan.opts.base for e in range(plan.opts.experts)]


def write_upcycled(plan: UpcyclePlan, out_dir: Path, log: Callable[[str], None] | None = None) -> int:
    """Write the MoE model directory (weights, config.json, tokenizer) into out_dir; return weight bytes."""
    from mlc.io.hfdir import copy_tokenizer_files, write_config
    from mlc.io.safetensors_reader import ModelTensors
    from mlc.io.safetensors_writer import ShardedWriter

    routers = initial_routers(plan)
    if log is not None:
        log(f"routers initialised ({plan.opts.router}); writing {len(plan.tensors)} tensors")
    with contextlib.ExitStack() as stack:
        readers = {BASE: stack.enter_context(ModelTensors(plan.base))}
        for i, src in enumerate(plan.sources):
            readers[i + 1] = stack.enter_context(ModelTensors(src))
        writer = ShardedWriter(out_dir, [(t.name, plan.dtype, t.shape) for t in plan.tensors])
        try:
            with _progress(sum(_numel(t.shape) for t in plan.tensors)) as advance:
                for name, tensor in output_tensors(plan, readers, routers):
                    writer.write(name, tensor)
                    advance(tensor.numel())
            writer.close()
        except BaseException:
            writer.abort()
            raise
    write_config(out_dir, plan.config)
    copy_tokenizer_files(plan.base, out_dir)
    return sum(_numel(t.shape) for t in plan.tensors) * plan.dtype.itemsize


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def initial_routers(plan: UpcyclePlan) -> Callable[[int], torch.Tensor]:
    """layer -> (experts, hidden) router weight; prompt routers run the base model once, up front."""
    opts, layers = plan.opts, plan.dense.num_hidden_layers
    if opts.router == "hidden":
        table = hidden_routers(plan.base, plan.prompts)
        return lambda layer: table[layer]
    if opts.router == "cheap_embed":
        table = cheap_embed_routers(plan.base, plan.prompts, layers)
        return lambda layer: table[layer]
    return lambda layer: random_router(opts.seed, layer, opts.experts, plan.dense.hidden_size)


def _reader_of(plan: UpcyclePlan, t: OutTensor) -> int:
    if t.kind == "expert":
        i = plan.expert_source(t.expert)
        return BASE if i is None else i + 1
    return MERGED if plan.merge_method is not None else BASE


def output_tensors(
    plan: UpcyclePlan, readers: dict[int, Any], routers: Callable[[int], torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, value) for every planned tensor; each dense tensor is read once per model it comes from."""
    groups: dict[str, list[OutTensor]] = {}  # dense tensor -> what derives from it, in plan order
    for t in plan.tensors:
        if t.source is None:
            yield t.name, _generated(plan, t, routers)
        else:
            groups.setdefault(t.source, []).append(t)
    for source, jobs in groups.items():
        for reader in sorted({_reader_of(plan, j) for j in jobs}):
            value = _merged(plan, readers, source) if reader == MERGED else readers[reader].read(source)
            for job in jobs:
                if _reader_of(plan, job) == reader:
                    yield job.name, _expert(plan, job, value) if job.kind == "expert" else value
            del value


def _generated(plan: UpcyclePlan, t: OutTensor, routers: Callable[[int], torch.Tensor]) -> torch.Tensor:
    if t.kind == "router":
        return routers(t.layer)
    # shared_gate: a zero gate makes sigmoid(gate . x) exactly 0.5, the half of the dense MLP that the
    # shared expert carries (the routed experts carry the other half, see _expert). zero_bias: zeros.
    return torch.zeros(t.shape)


def _expert(plan: UpcyclePlan, t: OutTensor, dense: torch.Tensor) -> torch.Tensor:
    """One expert's copy of a dense MLP weight: Drop-Upcycling, then the routing scale."""
    opts = plan.opts
    w = dense
    if opts.drop_ratio > 0:
        width = dense.shape[1] if t.proj == "down" else dense.shape[0]
        neurons = dropped_neurons(width, opts.drop_ratio, opts.seed, t.layer, t.expert)
        w = drop_upcycle(dense, t.proj or "", neurons, keyed_generator(opts.seed, "drop-values", t.layer, t.expert, t.proj))
    scale = 1.0
    if opts.routing == "softmax-topk":
        scale = softmax_topk_scale(opts.experts, opts.top_k)
    if opts.shared_expert and t.proj == "down":
        scale *= 0.5  # a power of two: exact, so routed + shared experts still sum to the dense MLP
    return w if scale == 1.0 else w.to(torch.float32) * scale


def _merged(plan: UpcyclePlan, readers: dict[int, Any], name: str) -> torch.Tensor:
    from mlc.commands.upcycle.shared import merge_shared_tensor

    assert plan.merge_method is not None
    sources = [readers[i + 1].read(name, torch.float32) for i in range(len(plan.sources))]
    base = readers[BASE].read(name, torch.float32) if plan.merge_method.base == "required" else None
    return merge_shared_tensor(plan.merge_method, plan.merge_params, plan.opts.seed, name, base, sources)


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[[int], None]]:
    from mlc import console

    if not console.progress_enabled():
        yield lambda n: None
        return
    from rich.progress import BarColumn, Progress, TimeRemainingColumn

    with Progress("upcycling", BarColumn(), "{task.percentage:>3.0f}%", TimeRemainingColumn(), console=console.err) as bar:
        task = bar.add_task("upcycle", total=total)
        yield lambda n: bar.advance(task, n)
