"""Pretrain or fine-tune (full or LoRA) on one CPU or a torchrun cluster, with exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mlc.cliutil import new_app

app = new_app(__doc__.splitlines()[0])

HELP = """Train as CONFIG.toml says (recipes: examples/train/).

Sections: [model] config or init, tokenizer, dtype; [data] mode (pretrain|sft), train, eval, val_fraction, seq_len,
shuffle; [train] steps, batch_size (global sequences per step), micro_batch_size, grad_clip, precision (fp32|bf16),
parallel (ddp|fsdp), compile, seed; [optim] name (adamw|muon), lr, weight_decay, betas, eps, momentum, nesterov,
ns_steps; [schedule] kind (cosine|wsd|constant), warmup_steps, warmup_start, min_lr_ratio, decay_fraction;
[lora] enabled, r, alpha, dropout, target_modules; [moe] aux_loss_coef, z_loss_coef; [eval] interval,
max_sequences; [checkpoint] interval, keep_last_k, resume (auto|none|run:<id>); [log] interval, tensorboard,
peak_flops; out.

With --nproc-per-node N (and --nnodes for several machines) mlc starts torchrun itself; under an existing torchrun
or srun every process just runs `mlc train`. A killed run resumes from its newest complete checkpoint when the same
command is run again (checkpoint.resume = "auto"), on any number of processes.
"""


@app.command(help=HELP)
def train(
    config: Path = typer.Argument(..., help="The TOML config file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key: section.key=value (repeatable)."),
    nproc_per_node: int = typer.Option(0, "--nproc-per-node", help="Start this many processes on this machine with torchrun."),
    nnodes: int = typer.Option(1, "--nnodes", help="Machines taking part (run the same command on each)."),
    node_rank: int = typer.Option(0, "--node-rank", help="This machine's index among --nnodes."),
    master_addr: str = typer.Option("127.0.0.1", "--master-addr", help="Address of node 0 (several machines)."),
    master_port: int = typer.Option(29500, "--master-port", help="Port on node 0 (several machines)."),
    peak_flops: float = typer.Option(0.0, "--peak-flops", help="Peak FLOP/s of one device for MFU (default: the table of known GPUs)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    import os
    import sys

    # Before torch loads OpenMP: idle threads sleep instead of spinning. On a CPU shared with other jobs, spinning
    # threads made the tiny recipe 7x slower (265 s vs 39 s wall here); on an idle machine the cost is negligible.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from mlc import console, options
    from mlc.commands.train.config import check_world, load_config
    from mlc.engine.launch import LaunchSpec, run_torchrun, under_launcher

    overrides = list(set_ or [])
    cfg, text = load_config(config, overrides)  # every config problem is reported here, before any work
    spec = LaunchSpec(max(nproc_per_node, 1), nnodes, node_rank, master_addr, master_port)
    if (nproc_per_node > 1 or nnodes > 1) and not under_launcher():
        check_world(cfg, spec.world_size)  # before starting any process
        if peak_flops:
            overrides.append(f"log.peak_flops={peak_flops}")
        args = ["mlc"] + (["--debug"] if options.get().debug else []) + ["train", str(Path(config).absolute())]
        args += [a for o in overrides for a in ("--set", o)]
        if json_output or options.get().json:
            args.append("--json")
        env = dict(os.environ, MLC_RUNS_DIR=str(options.get().runs_dir.absolute()))
        code = run_torchrun(spec, args, env)
        if code != 0:
            raise typer.Exit(code)
        return

    from mlc.commands.train.loop import train as run_training

    summary = run_training(cfg, text, peak_flops or cfg.log.peak_flops)
    if not summary:  # not rank 0
        return
    if options.want_json(json_output):
        console.print_json(summary)
    else:
        figures = f"loss {summary['final_loss']:.4f}"
        if summary.get("eval_loss") is not None:
            figures += f", eval loss {summary['eval_loss']:.4f} (ppl {summary['eval_ppl']:.2f})"
        console.info(f"trained {summary['steps']} steps on {summary['world_size']} process(es): {figures}")
        console.out.print(summary["artifact"] or summary["run_dir"], highlight=False)
    sys.stdout.flush()
