"""The training loop, top to bottom: data, model, parallelism, optimizers, resume, steps, evaluation, export.

Every process runs this same function (torchrun, srun, or alone). Rank 0 owns the run directory and writes the
metrics and artifacts; all ranks write their own checkpoint shards.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlc import console
from mlc.commands.train import moe
from mlc.commands.train.batches import PackedSamples, SampleOrder, micro_batch_positions
from mlc.commands.train.config import TrainConfig, check_world
from mlc.commands.train.display import LiveDisplay, MetricsSink
from mlc.commands.train.export import export_final
from mlc.commands.train.loss import evaluate, summed_cross_entropy
from mlc.commands.train.model import add_lora, blocks, create_model, flops_per_token, model_config
from mlc.commands.train.optim import build_optimizers, set_lr
from mlc.commands.train.rundir import CHECKPOINTS, training_run
from mlc.commands.train.schedule import lr_factor
from mlc.commands.train.tokens import tokenize_file, tokenizer_hash
from mlc.engine import dist as mdist
from mlc.engine import faults, parallel
from mlc.engine.checkpoint import CheckpointManager, TrainState, seed_everything
from mlc.engine.flops import device_peak_flops
from mlc.errors import InputError
from mlc.runs import Run

# Test hook: append {"step", "rank", "samples"} per micro-batch to this JSONL file (checks of the data position).
TRACE_ENV = "MLC_TRAIN_TRACE_SAMPLES"


@dataclass
class Data:
    train: PackedSamples
    eval: PackedSamples | None
    tokenizer_dir: Path


def train(config: TrainConfig, given_text: str = "", peak_flops: float = 0.0) -> dict[str, Any]:
    """Train as configured in this process (one of the world); returns rank 0's summary (others get {})."""
    info = mdist.init()
    try:
        with training_run(config, given_text, info) as (run, run_path):
            return _train(config, info, run, run_path, peak_flops)
    finally:
        mdist.shutdown()


def _train(config: TrainConfig, info: mdist.DistInfo, run: Run | None, run_path: Path, peak_flops: float) -> dict[str, Any]:
    tc, B, mb = config.train, config.train.batch_size, config.train.micro_batch_size
    accum = check_world(config, info.world_size)
    # Every process builds the same model (LoRA's random init included: FSDP2 shards each rank's own copy).
    seed_everything(tc.seed)
    init_dir = _init_dir(config, run)
    mcfg = model_config(config, init_dir)
    if config.data.seq_len > mcfg.max_position_embeddings:
        raise InputError(
            f"data.seq_len: {config.data.seq_len} is longer than the model's max_position_embeddings ({mcfg.max_position_embeddings})",
            "lower data.seq_len",
        )
    data = _prepare_data(config, init_dir, mcfg.vocab_size, run, info)

    model = create_model(config, init_dir)
    if config.lora.enabled:
        model = add_lora(model, config.lora)
    model.to(info.device)
    loss_fn = summed_cross_entropy
    if tc.compile:
        for block in blocks(model):
            block.compile()
        # Fuses the fp32 upcast of the logits into the loss instead of materialising a full fp32 copy.
        loss_fn = torch.compile(summed_cross_entropy)
    # DDP needs to know that an expert may get no token in a micro-batch (its parameters then have no gradient).
    model = _wrap(model, tc.parallel, info, find_unused=mcfg.is_moe)
    optimizers = build_optimizers(model, config.optim)
    seed_everything(tc.seed * 1000 + info.rank)  # from here on, each process draws its own random numbers
    state = TrainState(model, optimizers, trainable_only=config.lora.enabled)
    manager = CheckpointManager(run_path / CHECKPOINTS, config.checkpoint.keep_last_k)

    start = 0
    latest = manager.latest()
    if latest is not None:
        trainer = manager.load(latest, state)
        start = trainer["step"]
        if trainer["consumed_samples"] != start * config.train.batch_size:
            raise InputError(
                f"train.batch_size: the checkpoint in {latest} was trained with {trainer['consumed_samples'] // max(start, 1)} sequences per step",
                "resume with the batch size it was trained with (the data position counts global batches)",
            )
        if not trainer["rng_restored"]:  # another world size: per-process RNG streams cannot carry over
            seed_everything(tc.seed * 1000 + info.rank + 7919 * start)
        if run is not None:
            console.info(f"resuming run {run.id} from {latest.name} (saved on {trainer['world_size']} process(es), now {info.world_size})")
            run.log(f"resumed from {latest.name} (saved on {trainer['world_size']} processes, now {info.world_size})")
            run.log_metrics({"event": "resume", "step": start, "world_size": info.world_size})

    order = SampleOrder(len(data.train), tc.seed, config.data.shuffle)
    seq = config.data.seq_len
    tokens_per_step = B * seq
    fpt = flops_per_token(mcfg, seq)
    peak = device_peak_flops(info.device, peak_flops)
    autocast = _autocast(tc.precision, info.device)
    sink = MetricsSink(run, config.log.tensorboard) if run is not None else None
    trace = os.environ.get(TRACE_ENV)
    expert_counts: torch.Tensor | None = None
    rates: list[float] = []
    last: dict[str, Any] = {}

    with LiveDisplay(tc.steps, start) if info.is_main else contextlib.nullcontext() as display:
        for step in range(start, tc.steps):
            t0 = time.perf_counter()
            lr = set_lr(optimizers, lr_factor(step, tc.steps, config.schedule))
            micro, n_targets = _step_batches(data.train, order, step, accum, config, info, trace)
            loss_sum, counts = _forward_backward(model, micro, n_targets, loss_fn, autocast, config, mcfg, info)
            if counts is not None:
                expert_counts = counts if expert_counts is None else expert_counts + counts
            grad_norm = parallel.clip_grad_norm(model, tc.grad_clip)
            for opt in optimizers:
                opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            # One device sync per step, for both figures.
            step_loss, grad_norm = torch.cat([mdist.all_reduce_sum(loss_sum.reshape(1)) / n_targets, grad_norm.reshape(1).to(n_targets)]).tolist()
            if not math.isfinite(step_loss):
                raise InputError(f"the loss became {step_loss} at step {step + 1}", "lower optim.lr, or set train.grad_clip")
            elapsed = time.perf_counter() - t0
            rate = tokens_per_step / elapsed
            rates.append(rate)
            done = step + 1
            values: dict[str, Any] = {
                "step": done, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": rate, "mfu": (fpt * rate / (peak * info.world_size)) if peak else None,
                "tokens": done * tokens_per_step,
            }
            if expert_counts is not None and (done % config.log.interval == 0 or done == tc.steps):
                values.update(moe.utilisation_metrics(mdist.all_reduce_sum(expert_counts).cpu()))
                expert_counts = None
            if config.eval.interval and done % config.eval.interval == 0 and done < tc.steps and data.eval is not None:
                values.update(evaluate(model, data.eval, config.eval.max_sequences, mb, info, autocast))
            if sink is not None and (done % config.log.interval == 0 or done == tc.steps or "eval_loss" in values):
                sink.log(values)
            if display is not None:
                display.update(done, values)
            last.update(values)
            if config.checkpoint.interval and done % config.checkpoint.interval == 0 and done < tc.steps:
                manager.save(done, state, {"consumed_samples": done * B, "tokens": done * tokens_per_step})
            faults.maybe_kill("after-step", done)

    final: dict[str, Any] = {}
    if data.eval is not None:
        final = evaluate(model, data.eval, config.eval.max_sequences, mb, info, autocast)
        if sink is not None:
            sink.log({"step": tc.steps, **final})
    artifact = export_final(model, config, run, info, data.tokenizer_dir, init_dir)
    if sink is not None:
        sink.close()
    if run is None:
        return {}
    rates_sorted = sorted(rates)
    summary = {
        "steps": tc.steps,
        "final_loss": last.get("loss"),
        **{k: v for k, v in final.items()},
        "tokens": tc.steps * tokens_per_step,
        "median_tokens_per_s": rates_sorted[len(rates_sorted) // 2] if rates else None,
        "mfu": last.get("mfu"),
        "world_size": info.world_size,
        "artifact": str(artifact) if artifact else None,
        "checkpoints": str(run_path / CHECKPOINTS) if manager.latest() else None,
    }
    run.set_summary(**summary)
    return {"run": run.id, "run_dir": str(run.path), **summary}


def _step_batches(
    samples: PackedSamples, order: SampleOrder, step: int, accum: int, config: TrainConfig, info: mdist.DistInfo, trace: str | None
) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]:
    """This process's micro-batches (inputs, targets, mask) for `step`, and the target-token count of the global batch."""
    micro, local_targets = [], 0
    for m in range(accum):
        positions = micro_batch_positions(step, m, info.rank, info.world_size, config.train.micro_batch_size, config.train.batch_size)
        indices = [order[p] for p in positions]
        if trace:
            with open(trace, "a") as f:
                f.write(json.dumps({"step": step, "rank": info.rank, "samples": indices}) + "\n")
        batch = samples.batch(indices)
        local_targets += int(batch[2].sum())  # counted on the host: no device sync before the forward
        micro.append(tuple(_to_device(t, info.device) for t in batch))
    return micro, mdist.all_reduce_sum(torch.tensor([float(local_targets)], device=info.device)).clamp(min=1.0)


def _forward_backward(
    model: torch.nn.Module, micro: list, n_targets: torch.Tensor, loss_fn, autocast, config: TrainConfig, mcfg, info: mdist.DistInfo
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Accumulate the gradients of one optimizer step; returns the summed token loss and MoE routing counts."""
    loss_sum = torch.zeros((), device=info.device)
    counts = None
    top_k = mcfg.num_experts_per_tok
    for m, (x, y, mask) in enumerate(micro):
        parallel.sync_gradients(model, m == len(micro) - 1)  # reduce gradients once, after the last micro-batch
        with autocast():
            out = model(x, output_router_logits=mcfg.is_moe)
            ce = loss_fn(out.logits, y, mask)
            # Scaled so that DDP/FSDP's average over processes gives sum(token losses) / targets in the global batch.
            loss = ce * info.world_size / n_targets
            if mcfg.is_moe and out.router_logits:
                loss = loss + _moe_terms(config, out.router_logits, top_k) / len(micro)
                c = moe.expert_counts(out.router_logits, top_k)
                counts = c if counts is None else counts + c
        loss.backward()
        loss_sum += ce.detach()
    return loss_sum, counts


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _moe_terms(config: TrainConfig, router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    total = torch.zeros((), device=router_logits[0].device)
    if config.moe.aux_loss_coef:
        total = total + config.moe.aux_loss_coef * moe.load_balancing_loss(router_logits, top_k)
    if config.moe.z_loss_coef:
        total = total + config.moe.z_loss_coef * moe.z_loss(router_logits)
    return total


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _wrap(model: torch.nn.Module, how: str, info: mdist.DistInfo, find_unused: bool) -> torch.nn.Module:
    if how == "ddp" and info.distributed and find_unused:
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    return parallel.wrap(model, blocks(model), how, info.device)


def _init_dir(config: TrainConfig, run: Run | None) -> Path | None:
    """The trained model to start from (rank 0 records it as the run's input), the same path on every rank."""
    if not config.model.init:
        return None
    path: str | None = None
    if run is not None:
        recorded = [i for i in run.data["inputs"] if i["role"] == "init"]
        path = recorded[0]["path"] if recorded else str(run.add_input(config.model.init, role="init"))
    return Path(mdist.broadcast_object(path))


def _prepare_data(config: TrainConfig, init_dir: Path | None, vocab_size: int, run: Run | None, info: mdist.DistInfo) -> Data:
    """Tokenise (rank 0 first, into the cache; the others then read it) and cut into train and held-out samples."""
    from mlc.models.tokenizer import load_tokenizer

    d = config.data
    tok_dir = Path(config.model.tokenizer) if config.model.tokenizer else (init_dir or Path(config.model.config))
    if tok_dir.is_file():
        tok_dir = tok_dir.parent
    if not (tok_dir / "tokenizer.json").is_file():
        raise InputError(f"model.tokenizer: no tokenizer.json in {tok_dir}", "set model.tokenizer to a directory holding tokenizer.json")
    if run is not None and not any(i["role"] == "train-data" for i in run.data["inputs"]):
        run.add_input(d.train, role="train-data")
        if d.eval:
            run.add_input(d.eval, role="eval-data")
    tokenizer = load_tokenizer(tok_dir)
    tok_hash = tokenizer_hash(tok_dir)
    files: dict[str, Any] = {}
    for turn in ("main", "rest"):
        if (turn == "main") == info.is_main:
            files["train"] = tokenize_file(Path(d.train), d.mode, tokenizer, tok_hash, vocab_size)
            files["eval"] = tokenize_file(Path(d.eval), d.mode, tokenizer, tok_hash, vocab_size) if d.eval else None
        mdist.barrier()
    biggest = max(int(f.tokens.max()) for f in files.values() if f is not None)
    if biggest >= vocab_size:
        raise InputError(f"the tokenizer in {tok_dir} makes token id {biggest}, beyond the model's vocab_size {vocab_size}", "use the model's own tokenizer (model.tokenizer)")
    train = PackedSamples(files["train"], d.seq_len)
    held_out = PackedSamples(files["eval"], d.seq_len) if files["eval"] is not None else None
    if held_out is None and d.val_fraction > 0:
        train, held_out = train.split(d.val_fraction)
    if len(train) == 0:
        raise InputError(f"data.train: {d.train} has {len(files['train'])} tokens, too few for one sequence of data.seq_len={d.seq_len}", "lower data.seq_len or give more data")
    if held_out is not None and len(held_out) == 0:
        held_out = None
    return Data(train, held_out, tok_dir)
