"""The training loop, top to bottom: data, model, parallelism, optimizers, resume, steps, evaluation, export.

Every process runs this same function (torchrun, srun, or alone). Rank 0 owns the run directory and writes the
metrics and artifacts; all ranks write their own checkpoint shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlc import console
from mlc.commands.train import moe
from mlc.commands.train.averaging import WeightAverages
from mlc.commands.train.batches import PackedSamples, SampleOrder
from mlc.commands.train.config import TrainConfig, check_world, tp_size
from mlc.commands.train.display import LiveDisplay, MetricsSink
from mlc.commands.train.dpo import DpoTrainer, attach_reference, evaluate_pairs
from mlc.commands.train.export import export_final
from mlc.commands.train.loss import evaluate, summed_cross_entropy
from mlc.commands.train.model import add_lora, blocks, create_model, flops_per_token, model_config
from mlc.commands.train.optim import build_optimizers, set_lr
from mlc.commands.train.preference import PreferencePairs, tokenize_pairs
from mlc.commands.train.resume import CHECKPOINTS, training_run
from mlc.commands.train.schedule import lr_factor
from mlc.commands.train.step import Trainer, autocast, step_batches
from mlc.commands.train.tokens import tokenize_file, tokenizer_hash
from mlc.distributed import diloco, faults, parallel, report
from mlc.distributed import dist as mdist
from mlc.distributed.checkpoint import CheckpointManager, TrainState, seed_everything
from mlc.distributed.flops import device_peak_flops
from mlc.distributed.preemption import Preempted, Preemption
from mlc.distributed.snapshot import Snapshots
from mlc.errors import InputError
from mlc.runs import Run

# Test hook: append {"step", "rank", "samples"} per micro-batch to this JSONL file (checks of the data position).
TRACE_ENV = "MLC_TRAIN_TRACE_SAMPLES"


@dataclass
class Data:
    train: PackedSamples | PreferencePairs
    eval: PackedSamples | PreferencePairs | None
    tokenizer_dir: Path


def train(config: TrainConfig, given_text: str = "", peak_flops: float = 0.0) -> dict[str, Any]:
    """Train as configured in this process (one of the world); returns rank 0's summary (others get {})."""
    info = mdist.init()
    preemption = Preemption()
    try:
        with preemption.installed(), training_run(config, given_text, info) as (run, run_path):
            return _train(config, info, run, run_path, peak_flops, preemption)
    finally:
        mdist.shutdown()


def _train(
    config: TrainConfig, info: mdist.DistInfo, run: Run | None, run_path: Path, peak_flops: float, preemption: Preemption
) -> dict[str, Any]:
    tc, B, mb = config.train, config.train.batch_size, config.train.micro_batch_size
    # Every process builds the same model (LoRA's random init included: FSDP2 shards each rank's own copy).
    seed_everything(tc.seed)
    init_dir = _init_dir(config, run)
    mcfg = model_config(config, init_dir)
    accum = check_world(config, info.world_size, mcfg)
    info = dataclasses.replace(info, tp_size=tp_size(config, info.world_size))
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
    seed_everything(tc.seed * 1000 + info.dp_rank)  # from here on, each data share draws its own random numbers
    # Weight averages start from the weights before the first step (a resumed run loads them with the rest).
    averages = WeightAverages(model, config.average) if config.average.ema or config.average.lawa_k else None
    outer = diloco.create(model, optimizers, config, info)  # train.parallel = "diloco": the outer optimizer
    extra_state = {**({"average": averages} if averages else {}), **({"diloco": outer} if outer else {})}
    state = TrainState(model, optimizers, trainable_only=config.lora.enabled, extra=extra_state or None)
    manager = CheckpointManager(run_path / CHECKPOINTS, config.checkpoint.keep_last_k, async_save=config.checkpoint.async_save)

    snapshots = _snapshots(config, info, run_path)
    start = 0
    latest = manager.latest()
    # A snapshot newer than the newest disk checkpoint (held by the keepers that outlived the last trainer) wins.
    trainer = snapshots.restore(state, manager.steps()[-1][0] if latest else 0) if snapshots is not None else None
    if trainer is not None or latest is not None:
        if trainer is None:
            diloco.check_resume(outer, latest, info.world_size)
            trainer = manager.load(latest, state)
            source = latest.name
        else:
            source = f"the in-memory snapshot of step {trainer['step']}"
            if trainer["rebuilt_rank"] is not None:
                source += f" (rank {trainer['rebuilt_rank']}'s shard rebuilt from the peers' parity)"
        start = trainer["step"]
        if trainer["consumed_samples"] != start * config.train.batch_size:
            raise InputError(
                f"train.batch_size: {source} was trained with {trainer['consumed_samples'] // max(start, 1)} sequences per step",
                "resume with the batch size it was trained with (the data position counts global batches)",
            )
        if not trainer["rng_restored"]:  # another world size: per-process RNG streams cannot carry over
            seed_everything(tc.seed * 1000 + info.dp_rank + 7919 * start)
        if run is not None:
            console.info(f"resuming run {run.id} from {source} (saved on {trainer['world_size']} process(es), now {info.world_size})")
            run.log(f"resumed from {source} (saved on {trainer['world_size']} processes, now {info.world_size})")
            event = {"event": "resume", "step": start, "world_size": info.world_size}
            if "rebuilt_rank" in trainer:
                event.update(snapshot=start, rebuilt_rank=trainer["rebuilt_rank"])
            run.log_metrics(event)

    dpo_mode = config.data.mode == "dpo"
    if dpo_mode:
        seconds = attach_reference(model, {"train": data.train, "eval": data.eval}, run_path, start > 0, mb, info, autocast(tc.precision, info.device))
        if run is not None and seconds:
            run.log(f"reference log-probs of {len(data.train)} + {len(data.eval or [])} pairs computed in {seconds:.1f} s")

    order = SampleOrder(len(data.train), tc.seed, config.data.shuffle)
    seq = config.data.seq_len
    tokens_per_step = B * seq
    fpt = flops_per_token(mcfg, seq)
    peak = device_peak_flops(info.device, peak_flops)
    trainer = (DpoTrainer if dpo_mode else Trainer)(model, optimizers, config, mcfg, info, loss_fn, autocast(tc.precision, info.device))
    if dpo_mode:
        trainer.beta = config.dpo.beta
    sink = MetricsSink(run, config.log.tensorboard) if run is not None else None
    trace = os.environ.get(TRACE_ENV)
    expert_counts: torch.Tensor | None = None
    rates: list[float] = []
    last: dict[str, Any] = {}

    with LiveDisplay(tc.steps, start) if info.is_main else contextlib.nullcontext() as display:
        for step in range(start, tc.steps):
            t0 = time.perf_counter()
            lr = set_lr(optimizers, lr_factor(step, tc.steps, config.schedule))
            micro, n_targets = step_batches(data.train, order, step, accum, config, info, trace)
            loss_sum, grad_norm, counts = trainer.train_step(micro, n_targets)
            if outer is not None:
                outer.after_step(step + 1)
            if averages is not None:
                averages.update(step + 1)
            if counts is not None:
                expert_counts = counts if expert_counts is None else expert_counts + counts
            # One all-reduce and one device sync per step: the loss (and DPO's figures), and whether any process was
            # asked to stop. A TP group's processes hold the same sums: only the first one's count.
            extra = getattr(trainer, "sums", {})
            w = info.data_weight
            summed = mdist.all_reduce_sum(torch.stack([loss_sum * w, loss_sum.new_tensor(float(preemption.requested)), *(v * w for v in extra.values())]))
            means = torch.cat([summed[:1] / n_targets, summed[1:2], summed[2:] / n_targets, grad_norm.reshape(1).to(n_targets)]).tolist()
            step_loss, stop, grad_norm = means[0], means[1], means[-1]
            if not math.isfinite(step_loss):
                raise InputError(f"the loss became {step_loss} at step {step + 1}", "lower optim.lr, or set train.grad_clip")
            elapsed = time.perf_counter() - t0
            rate = tokens_per_step / elapsed
            rates.append(rate)
            done = step + 1
            values: dict[str, Any] = {
                "step": done, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": rate, "mfu": (fpt * rate / (peak * info.world_size)) if peak else None,
                "tokens": done * tokens_per_step, **dict(zip(extra, means[2:-1])),
            }
            if outer is not None:
                values["comm_bytes"] = outer.bytes_sent
            if expert_counts is not None and (done % config.log.interval == 0 or done == tc.steps):
                values.update(moe.utilisation_metrics(mdist.all_reduce_sum(expert_counts).cpu()))
                expert_counts = None
            if config.eval.interval and done % config.eval.interval == 0 and done < tc.steps and data.eval is not None:
                values.update(_evaluate(model, data.eval, config, info, trainer.autocast, averages))
            if sink is not None and (done % config.log.interval == 0 or done == tc.steps or "eval_loss" in values):
                sink.log(values)
            if display is not None:
                display.update(done, values)
            last.update(values)
            progress = {"consumed_samples": done * B, "tokens": done * tokens_per_step}
            on_disk = config.checkpoint.interval and done % config.checkpoint.interval == 0
            if on_disk and done < tc.steps:
                _checkpoint(manager, state, done, progress, run)
            elif snapshots is not None and done % config.checkpoint.snapshot_interval == 0 and done < tc.steps:
                t_snap = time.perf_counter()
                snapshots.save(done, state, progress)
                if run is not None:
                    run.log_metrics({"event": "snapshot", "step": done, "blocking_s": round(time.perf_counter() - t_snap, 6)})
            faults.maybe_kill("after-step", done)
            if stop and done < tc.steps:
                _stop_for_preemption(manager, state, done, progress, preemption, run)

    manager.close()  # an asynchronous write still in flight completes (or fails) here
    if outer is not None:
        outer.finish(tc.steps)  # the last round may be shorter than inner_steps: every worker ends on the shared weights
    final: dict[str, Any] = {}
    if data.eval is not None:
        final = _evaluate(model, data.eval, config, info, trainer.autocast, averages)
        if sink is not None:
            sink.log({"step": tc.steps, **final})
    artifact = export_final(model, config, run, info, data.tokenizer_dir, init_dir)
    for name in averages.names if averages is not None else []:
        if averages.ready(name):
            with averages.swapped_in(name):
                export_final(model, config, run, info, data.tokenizer_dir, init_dir, average=name)
    if snapshots is not None:
        snapshots.close(run_completed=True)  # the keepers exit: a completed run is never resumed
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


def _checkpoint(manager: CheckpointManager, state: TrainState, done: int, progress: dict[str, Any], run: Run | None) -> None:
    """Save step `done`, recording how long the loop was blocked (with async_save: the copy to host memory)."""
    t0 = time.perf_counter()
    manager.save(done, state, progress)
    if run is not None:
        event = {"event": "checkpoint", "step": done, "blocking_s": round(time.perf_counter() - t0, 6)}
        if manager.writer is not None and manager.writer.last_write_s is not None:
            event["previous_write_s"] = round(manager.writer.last_write_s, 6)  # the background write before this one
        if manager.writer is not None:  # optimizer steps that waited for a staging copy, all saves so far together
            event["staging_wait_s"] = round(manager.writer.wait_s, 6)
        run.log_metrics(event)


def _snapshots(config: TrainConfig, info: mdist.DistInfo, run_path: Path) -> Snapshots | None:
    """This rank's connection to its snapshot keeper (started if none runs), when checkpoint.snapshot_interval is set."""
    if not config.checkpoint.snapshot_interval:
        return None
    layout = f"{config.train.parallel}/tp{info.tp_size}/lora{int(config.lora.enabled)}"
    return Snapshots(run_path, info.rank, info.world_size, layout, config.checkpoint.snapshot_keep_s, info.is_main)


def _evaluate(
    model: torch.nn.Module, held_out: Any, config: TrainConfig, info: mdist.DistInfo, autocast_, averages: WeightAverages | None
) -> dict[str, float]:
    """The held-out figures of the trained weights, and of each weight average next to them (eval_loss_ema, ...)."""
    mb = config.train.micro_batch_size

    def figures() -> dict[str, float]:
        if config.data.mode == "dpo":
            return evaluate_pairs(model, held_out, config.eval.max_sequences, mb, info, autocast_, config.dpo.beta)
        return evaluate(model, held_out, config.eval.max_sequences, mb, info, autocast_)

    values = figures()
    for name in averages.names if averages is not None else []:
        if averages.ready(name):
            with averages.swapped_in(name):
                values.update({f"{k}_{name}": v for k, v in figures().items()})
    return values


def _stop_for_preemption(
    manager: CheckpointManager, state: TrainState, done: int, progress: dict[str, Any], preemption: Preemption, run: Run | None
) -> None:
    """Checkpoint step `done` (unless that step was just saved) and raise Preempted; every rank calls it."""
    manager.close()  # an asynchronous write in flight finishes first; this last one is written synchronously
    latest = manager.latest()
    path = latest if latest is not None and latest == manager.step_dir(done) else manager.save(done, state, progress)
    message = (
        f"preempted by SIGTERM after step {done}: checkpoint {path.name} written {preemption.seconds():.1f} s after the "
        "signal. Run the same command to resume"
    )
    if run is not None:
        run.log_metrics({"event": "preempted", "step": done, "seconds": round(preemption.seconds(), 3)})
        if report.active():
            report.write_preempted(message)
    raise Preempted(message)


def _wrap(model: torch.nn.Module, how: str, info: mdist.DistInfo, find_unused: bool) -> torch.nn.Module:
    if how == "diloco":  # each worker trains its own copy; mlc.distributed.diloco averages them every H steps
        return model
    if how == "tp":
        return parallel.tensor_parallel(model, blocks(model), info.tp_size, info.device)
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

    def read(path: Path) -> Any:
        if d.mode == "dpo":
            return tokenize_pairs(path, tokenizer, tok_hash, vocab_size, d.seq_len)
        return tokenize_file(path, d.mode, tokenizer, tok_hash, vocab_size)

    for turn in ("main", "rest"):
        if (turn == "main") == info.is_main:
            files["train"] = read(Path(d.train))
            files["eval"] = read(Path(d.eval)) if d.eval else None
        mdist.barrier()
    biggest = max(int(f.tokens.max()) for f in files.values() if f is not None and len(f.tokens))
    if biggest >= vocab_size:
        raise InputError(f"the tokenizer in {tok_dir} makes token id {biggest}, beyond the model's vocab_size {vocab_size}", "use the model's own tokenizer (model.tokenizer)")
    if d.mode == "dpo":
        train, held_out = files["train"], files["eval"]
    else:
        train = PackedSamples(files["train"], d.seq_len)
        held_out = PackedSamples(files["eval"], d.seq_len) if files["eval"] is not None else None
    if held_out is None and d.val_fraction > 0:
        train, held_out = train.split(d.val_fraction)
    if len(train) == 0:
        raise InputError(f"data.train: {d.train} has {len(files['train'].tokens)} tokens, too few for one sequence of data.seq_len={d.seq_len}", "lower data.seq_len or give more data")
    if held_out is not None and len(held_out) == 0:
        held_out = None
    return Data(train, held_out, tok_dir)
