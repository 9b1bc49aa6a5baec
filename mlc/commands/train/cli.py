"""Pretrain or fine-tune (full or LoRA) on one CPU or a torchrun cluster, with exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mlc.cliutil import new_app

app = new_app(__doc__.splitlines()[0])

HELP = """Train as CONFIG.toml says (recipes: examples/train/).

Sections: [model] config or init, tokenizer, dtype; [data] mode (pretrain|sft|dpo), train, eval, val_fraction,
seq_len, shuffle; [dpo] beta; [average] ema, ema_decay, lawa_k, lawa_interval; [train] steps, batch_size (global sequences per step), micro_batch_size, grad_clip, precision (fp32|bf16),
parallel (ddp|fsdp|diloco|tp), tp_size, compile, seed; [diloco] inner_steps, outer_lr, outer_momentum, quantize; [optim] name (adamw|muon|galore), lr, weight_decay, betas, eps, momentum, nesterov,
ns_steps, galore_rank, galore_update_proj_gap, galore_scale; [schedule] kind (cosine|wsd|constant), warmup_steps, warmup_start, min_lr_ratio, decay_fraction;
[lora] enabled, base (dense|nf4: QLoRA), r, alpha, dropout, target_modules; [moe] aux_loss_coef, z_loss_coef; [eval] interval,
max_sequences; [checkpoint] interval, keep_last_k, resume (auto|none|run:<id>), async_save; [log] interval, tensorboard,
peak_flops; out.

With --nproc-per-node N mlc starts the processes itself (torch's elastic agent, as torchrun does); on several machines
run the same command on each with --nnodes M --node-rank R --rdzv-endpoint HOST:PORT. Under an existing torchrun or
srun every process just runs `mlc train`. A killed run resumes from its newest complete checkpoint when the same
command is run again (checkpoint.resume = "auto"), on any number of processes; --max-restarts K does that
automatically. SIGTERM (what SLURM and Kubernetes send) writes a checkpoint and exits 0.

--slurm submits the run as a SLURM job instead (submitit): --nodes, --gpus-per-node, --time, --partition, --account,
--sbatch key=value; --dry-run prints the sbatch script. Keep --runs-dir on storage that every node sees.
"""


@app.command(help=HELP)
def train(
    config: Path = typer.Argument(..., help="The TOML config file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key: section.key=value (repeatable)."),
    nproc_per_node: int = typer.Option(0, "--nproc-per-node", help="Start this many processes on this machine (torch's elastic agent, as torchrun)."),
    nnodes: int = typer.Option(1, "--nnodes", help="Machines taking part (run the same command on each)."),
    node_rank: int = typer.Option(0, "--node-rank", help="This machine's index among --nnodes (node 0 hosts the rendezvous)."),
    rdzv_endpoint: str = typer.Option("", "--rdzv-endpoint", help="HOST:PORT of node 0 for several machines (torchrun's c10d rendezvous)."),
    max_restarts: int = typer.Option(0, "--max-restarts", help="Restart all workers from the newest checkpoint up to K times when one dies."),
    grace_period: float = typer.Option(30.0, "--grace-period", help="Seconds the workers get after SIGTERM to write a checkpoint before they are killed."),
    peak_flops: float = typer.Option(0.0, "--peak-flops", help="Peak FLOP/s of one device for MFU (default: the table of known GPUs)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    slurm: bool = typer.Option(False, "--slurm", help="Submit as a SLURM job (sbatch, through submitit) instead of training here."),
    nodes: int = typer.Option(1, "--nodes", help="--slurm: nodes to ask for (one mlc launcher per node)."),
    gpus_per_node: int = typer.Option(0, "--gpus-per-node", help="--slurm: GPUs per node (and processes per node unless --nproc-per-node)."),
    time_limit: str = typer.Option("01:00:00", "--time", help="--slurm: the job's time limit (HH:MM:SS, D-HH:MM:SS or minutes)."),
    partition: str = typer.Option("", "--partition", help="--slurm: the partition."),
    account: str = typer.Option("", "--account", help="--slurm: the account to charge."),
    sbatch: Optional[List[str]] = typer.Option(None, "--sbatch", help="--slurm: another #SBATCH flag as key=value (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="--slurm: print the sbatch script instead of submitting it."),
) -> None:
    import os
    import sys

    # Before torch loads OpenMP: idle threads sleep instead of spinning. On a CPU shared with other jobs, spinning
    # threads made the tiny recipe 7x slower (265 s vs 39 s wall here); on an idle machine the cost is negligible.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from mlc import console, options
    from mlc.commands.train.config import check_world, known_model, load_config
    from mlc.distributed import report
    from mlc.distributed.launch import LaunchSpec, launch, under_launcher

    overrides = list(set_ or [])
    cfg, text = load_config(config, overrides)  # every config problem is reported here, before any work
    slurm_only = {"--nodes": nodes != 1, "--gpus-per-node": gpus_per_node != 0, "--time": time_limit != "01:00:00",
                  "--partition": bool(partition), "--account": bool(account), "--sbatch": bool(sbatch), "--dry-run": dry_run}
    given = [name for name, set_here in slurm_only.items() if set_here]
    if given and not slurm:
        from mlc.errors import MlcUsageError

        raise MlcUsageError(f"{', '.join(given)} only apply to a SLURM submission", "add --slurm (or use --nnodes/--nproc-per-node to launch here)")
    if slurm:
        _submit_to_slurm(config, overrides, cfg, nodes, gpus_per_node, nproc_per_node, time_limit, partition, account, sbatch or [], dry_run, json_output)
        return
    spec = LaunchSpec(max(nproc_per_node, 1), nnodes, node_rank, rdzv_endpoint, max_restarts, grace_period)
    if (nproc_per_node > 1 or nnodes > 1 or max_restarts > 0) and not under_launcher():
        spec.check()
        check_world(cfg, spec.world_size, known_model(cfg) if cfg.train.parallel == "tp" else None)  # before starting any process
        if peak_flops:
            overrides.append(f"log.peak_flops={peak_flops}")
        flags = (["--debug"] if options.get().debug else []) + (["--quiet"] if options.get().verbosity < 0 else [])
        args = ["mlc", *flags, "train", str(Path(config).absolute())]
        args += [a for o in overrides for a in ("--set", o)]
        if json_output or options.get().json:
            args.append("--json")
        spec.env = {"MLC_RUNS_DIR": str(options.get().runs_dir.absolute())}
        code = launch(spec, args, ["mlc", *sys.argv[1:]], verbose=options.get().verbosity > 0)
        if code != 0:
            raise typer.Exit(code)
        return

    from mlc.commands.train.loop import train as run_training
    from mlc.distributed.dist import env_ranks
    from mlc.distributed.preemption import Preempted

    try:
        summary = run_training(cfg, text, peak_flops or cfg.log.peak_flops)
    except Preempted as e:  # a checkpoint was written: exit 0, so that schedulers do not count it as a failure
        if env_ranks()[0] == 0 and not report.active():  # under mlc's launcher, the launcher says it
            console.info(str(e))
        return
    except Exception as e:
        # Under mlc's launcher a worker reports to it instead of printing (it prints the root cause once).
        if report.active() and not options.get().debug:
            raise typer.Exit(report.write_error(e)) from None
        raise
    if not summary:  # not rank 0
        return
    if options.want_json(json_output):
        console.print_json(summary)
    else:
        figures = f"loss {summary['final_loss']:.4f}"
        if summary.get("eval_loss") is not None:
            figures += f", eval loss {summary['eval_loss']:.4f}"
        if summary.get("eval_ppl") is not None:
            figures += f" (ppl {summary['eval_ppl']:.2f})"
        if summary.get("eval_margin") is not None:
            figures += f", eval margin {summary['eval_margin']:.3f} (accuracy {summary['eval_accuracy']:.2f})"
        console.info(f"trained {summary['steps']} steps on {summary['world_size']} process(es): {figures}")
        console.out.print(summary["artifact"] or summary["run_dir"], highlight=False)
    sys.stdout.flush()


def _submit_to_slurm(
    config: Path, overrides: list[str], cfg, nodes: int, gpus_per_node: int, nproc_per_node: int, time_limit: str,
    partition: str, account: str, sbatch: list[str], dry_run: bool, json_output: bool,
) -> None:
    """--slurm: check everything here, then print the sbatch script (--dry-run) or submit it through submitit."""
    from mlc import console, options
    from mlc.commands.train.config import check_world
    from mlc.errors import MlcUsageError

    try:
        from mlc.commands.train import slurm as slurm_
    except ImportError:  # pragma: no cover - submitit is a dependency of the slurm extra
        raise MlcUsageError("--slurm needs submitit", "pip install 'mlc[slurm]'") from None
    spec = slurm_.SlurmSpec(nodes, gpus_per_node, nproc_per_node, time_limit, partition, account, list(sbatch))
    spec.check()
    check_world(cfg, spec.nodes * spec.processes)  # before anything is submitted
    runs = options.get().runs_dir
    job = slurm_.TrainJob(slurm_.job_argv(config, overrides, runs, options.get().debug), spec.processes)
    name = f"mlc-train-{config.stem}"
    if dry_run:
        console.out.print(slurm_.sbatch_script(spec, job, runs, name), highlight=False, markup=False)
        return
    submitted = slurm_.submit(spec, job, runs, name)
    log = str(submitted.paths.stdout).replace("%t", "0")
    if options.want_json(json_output):
        console.print_json({"job_id": submitted.job_id, "log": log, "folder": str(submitted.paths.folder)})
    else:
        console.info(f"submitted SLURM job {submitted.job_id} ({spec.nodes} node(s) x {spec.processes} process(es)); log: {log}")
