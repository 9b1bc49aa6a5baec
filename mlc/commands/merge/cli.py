"""Merge models from a mergekit YAML; fold, combine and extract LoRA adapters; search merge weights.

Usage:  mlc merge CONFIG.yml --out DIR        (a mergekit YAML, as is)
        mlc merge lora BASE ADAPTER... --out DIR
        mlc merge extract-lora BASE TUNED --rank R --out ADAPTER
        mlc merge search POOL... --objective NAME=FILE --out DIR

Only typer and click are imported here: torch and the merge machinery load when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click
import typer
from typer.core import TyperGroup

from mlc.cliutil import json_option, new_app, parse_shard_size

HELP = """Merge models: mergekit YAMLs as is, LoRA adapters, and searched merges of checkpoint pools.

\b
  mlc merge CONFIG.yml --out DIR [options]     run a mergekit-style merge (see `mlc merge run --help`)
  mlc merge lora BASE ADAPTER... --out DIR      fold (and combine) PEFT LoRA adapters into a base
  mlc merge extract-lora BASE TUNED --rank R --out ADAPTER
  mlc merge search POOL... --objective NAME=FILE --out DIR

\b
Methods: every one of mergekit's: linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
breadcrumbs_ties, della, della_linear, sce, slerp, nuslerp, multislerp, karcher, model_stock, nearswap,
arcee_fusion, ram, ramplus_tl, passthrough (layer stacking with slices), plus any installed plugin.
Outputs equal mergekit's bit for bit on the same YAML (the random methods: the same distribution).
Everything is validated before a weight is read; every problem is listed at once.

DARE/DELLA rescaling: mlc defaults to mergekit's (restore each sparsified task vector's L1 norm) so
its YAMLs give the same models; the papers' 1/(1-p) rescaling is `rescale_mode: inverse_keep` in the
YAML or --rescale-mode inverse_keep.
"""


class MergeGroup(TyperGroup):
    """`mlc merge CONFIG.yml ...` runs the hidden `run` command; named subcommands work as usual."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "run", self.commands["run"], args
        return super().resolve_command(ctx, args)


app = new_app(HELP)
app.info.cls = MergeGroup


@app.callback()
def merge_group() -> None:
    """Merge models (a group: the default command runs a YAML config)."""


def _progress(total: int, enabled: bool) -> Any:
    from mlc import console

    if not enabled or not console.progress_enabled():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console.err, transient=True)
    progress.add_task("merging", total=total)
    return progress


@app.command("run", hidden=True)
def run_command(
    config: Path = typer.Argument(..., help="A mergekit-style YAML config.", metavar="CONFIG.yml"),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory (written atomically)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    seed: int = typer.Option(0, "--seed", help="Seed for random methods (dare_*, della*): same seed, same bits."),
    rescale_mode: Optional[str] = typer.Option(
        None,
        "--rescale-mode",
        help="How DARE/DELLA rescale kept entries: l1 (mergekit's default: restore the L1 norm) or inverse_keep "
        "(the papers' 1/(1-p)). Sets the global parameter rescale_mode; YAML settings at model or slice level still win.",
    ),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 2GB or 500MB."),
    check: bool = typer.Option(False, "--check", help="Validate the config and inputs, print the plan summary, write nothing."),
    json_output: bool = json_option(),
) -> None:
    """Run a mergekit-style YAML merge into an HF model directory, streamed one tensor at a time."""
    from mlc import console, options
    from mlc.commands.merge.api import plan_merge, run_merge

    if rescale_mode is not None and rescale_mode not in ("l1", "inverse_keep"):
        raise typer.BadParameter("must be l1 or inverse_keep", param_hint="--rescale-mode")
    overrides = {"rescale_mode": rescale_mode} if rescale_mode else {}
    as_json = options.want_json(json_output)
    if check:
        plan = plan_merge(config, parameters=overrides, seed=seed, out=out, overwrite=overwrite)
        plan.close()
        summary = {
            "method": plan.method.name, "models": [str(m.path) for m in plan.models], "read_as": [m.tensors.source for m in plan.models],
            "tensors": len(plan.jobs), "warnings": plan.warnings,
        }
        for w in plan.warnings:
            console.warn(w)
        console.print_json(summary) if as_json else console.info(f"ok: {plan.method.name} over {len(plan.models)} models, {len(plan.jobs)} tensors")
        return
    bar = None

    def on_plan(plan: Any) -> None:
        nonlocal bar
        for w in plan.warnings:
            console.warn(w)
        bar = _progress(len(plan.jobs), not as_json)
        if bar is not None:
            bar.start()

    def on_done(job: Any) -> None:
        if bar is not None:
            bar.update(bar.task_ids[0], advance=1, description=job.group)

    try:
        result = run_merge(config, out, parameters=overrides, seed=seed, overwrite=overwrite, max_shard_bytes=parse_shard_size(max_shard_size), on_plan=on_plan, on_done=on_done)
    finally:
        if bar is not None:
            bar.stop()
    if as_json:
        console.print_json({"out": str(result.out), "run": result.run_id, "tensors": result.tensors, "files": result.files, "warnings": result.warnings})
    else:
        console.info(f"merged {result.tensors} tensors into {result.out} (run {result.run_id})")


def _adapter_params(weights: Optional[str], density: Optional[float], items: list[str]) -> dict[str, Any]:
    import yaml

    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        params[key.strip()] = yaml.safe_load(f"[{value}]") if "," in value else yaml.safe_load(value)
    if weights is not None:
        params["weight"] = [float(w) for w in weights.split(",")]
    if density is not None:
        params["density"] = density
    return params


@app.command("lora")
def lora_command(
    base: str = typer.Argument(..., help="Base model directory or mlc reference."),
    adapters: list[str] = typer.Argument(..., help="PEFT LoRA adapter directories (or references)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory."),
    method: Optional[str] = typer.Option(None, "--method", help="Combine several adapters first: linear, ties, dare_ties, dare_linear, task_arithmetic, ..."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Per-adapter weights, comma-separated (default: equal, summing to 1)."),
    density: Optional[float] = typer.Option(None, "--density", help="Fraction of each adapter's delta kept (ties, dare_*)."),
    param: list[str] = typer.Option([], "--param", help="Any other method parameter, KEY=VALUE (repeatable)."),
    seed: int = typer.Option(0, "--seed", help="Seed for random methods."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Store floating tensors as float32, bfloat16 or float16 (default: the base's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    json_output: bool = json_option(),
) -> None:
    """Fold one PEFT LoRA adapter into its base, or several after combining them with a merge method."""
    from mlc import console, options
    from mlc.commands.merge.lora import check_fold, fold
    from mlc.commands.merge.plan import load_method
    from mlc.dtypes import FLOAT_DTYPES, torch_dtype
    from mlc.errors import ValidationError
    from mlc.runs import open_run
    from mlc.runs.refs import resolve

    root = options.get().runs_dir
    params = _adapter_params(weights, density, param)
    chosen = load_method(method) if method else None
    if chosen is not None and "weight" not in params and chosen.param("weight") is not None:
        params["weight"] = [1.0 / len(adapters)] * len(adapters)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValidationError([f"--dtype {dtype!r} is not one of {', '.join(FLOAT_DTYPES)}"], what="LoRA fold")
    problems = [f"output {out} already exists (pass --overwrite to replace it)"] if out.exists() and not overwrite else []
    base_path, adapter_paths = resolve(base, root).path, [resolve(a, root).path for a in adapters]
    try:
        check_fold(base_path, adapter_paths, chosen, params)
    except ValidationError as e:
        problems = e.problems + problems
    if problems:
        raise ValidationError(problems, what="LoRA fold")
    config = {"base": str(base_path), "adapters": [str(a) for a in adapter_paths], "method": method, "params": params, "seed": seed, "dtype": dtype}
    with open_run("merge-lora", config=config) as run:
        run.add_input(base, role="base")
        for a in adapters:
            run.add_input(a, role="adapter")
        with run.artifact("model", kind="model", out=out, overwrite=overwrite) as staging:
            changed = fold(base_path, adapter_paths, staging, chosen, params, seed, torch_dtype(dtype) if dtype else None)
        run.set_summary(tensors_changed=changed, adapters=len(adapters))
    if options.want_json(json_output):
        console.print_json({"out": str(out.absolute()), "run": run.id, "tensors_changed": changed})
    else:
        console.info(f"folded {len(adapters)} adapter(s) into {out} ({changed} tensors changed, run {run.id})")


@app.command("extract-lora")
def extract_lora_command(
    base: str = typer.Argument(..., help="Base model directory or mlc reference."),
    tuned: str = typer.Argument(..., help="Fine-tuned model directory or reference (same architecture)."),
    rank: int = typer.Option(..., "--rank", "-r", help="LoRA rank (truncated SVD of each delta)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output adapter directory (PEFT format)."),
    dtype: str = typer.Option("float32", "--dtype", help="Adapter dtype: float32, bfloat16 or float16."),
    no_embeddings: bool = typer.Option(False, "--no-embeddings", help="Leave embedding deltas out of the adapter."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    json_output: bool = json_option(),
) -> None:
    """Extract a rank-R LoRA adapter (truncated SVD of tuned - base) that PEFT loads."""
    from mlc import console, options
    from mlc.commands.merge.lora import extract
    from mlc.dtypes import FLOAT_DTYPES, torch_dtype
    from mlc.errors import ValidationError
    from mlc.runs import open_run
    from mlc.runs.refs import resolve

    if dtype not in FLOAT_DTYPES:
        raise ValidationError([f"--dtype {dtype!r} is not one of {', '.join(FLOAT_DTYPES)}"], what="LoRA extraction")
    if out.exists() and not overwrite:
        raise ValidationError([f"output {out} already exists (pass --overwrite to replace it)"], what="LoRA extraction")
    root = options.get().runs_dir
    base_path, tuned_path = resolve(base, root).path, resolve(tuned, root).path
    with open_run("merge-extract-lora", config={"base": str(base_path), "tuned": str(tuned_path), "rank": rank, "dtype": dtype}) as run:
        run.add_input(base, role="base")
        run.add_input(tuned, role="tuned")
        with run.artifact("adapter", kind="lora", out=out, overwrite=overwrite) as staging:
            report = extract(base_path, tuned_path, staging, rank, torch_dtype(dtype), include_embeddings=not no_embeddings)
        errors = [t["relative_error"] for t in report["tensors"].values()]
        run.set_summary(rank=rank, tensors=len(errors), max_relative_error=max(errors), not_representable=report["not_representable"])
    for name, size in report["not_representable"].items():
        console.warn(f"{name} differs (max |delta| {size:.3g}) but is not a 2-D weight: a LoRA cannot carry it")
    if options.want_json(json_output):
        console.print_json({"out": str(out.absolute()), "run": run.id, **report})
    else:
        console.info(f"extracted rank-{rank} LoRA for {len(errors)} tensors into {out} (max relative error {max(errors):.3g}, run {run.id})")


@app.command("search")
def search_command(
    pool: list[str] = typer.Argument(..., help="Pool checkpoints (directories or mlc references), same architecture and tokenizer."),
    objective: list[str] = typer.Option(
        ..., "--objective", help="NAME=FILE, repeatable: a .txt (or .jsonl of {text}) is scored by perplexity; a .jsonl of "
        "{context, choices, answer} by multiple-choice accuracy."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Where the best merge is written (HF directory)."),
    optimizer: str = typer.Option("cmaes", "--optimizer", help="cmaes: CMA-ES on the macro-average loss; nsga2: multi-objective NSGA-II (both from optuna)."),
    trials: int = typer.Option(40, "--trials", help="Budget: searched candidates (after the pool members and the uniform average)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Budget: stop searching after this many seconds."),
    seed: int = typer.Option(0, "--seed", help="Seed of the optimiser."),
    context: int = typer.Option(256, "--context", help="Perplexity window (tokens)."),
    workers: int = typer.Option(
        1, "--workers", help="Score candidates in this many parallel processes (each loads the pool); with --ray, this many "
        "actors (0: one per CPU of the cluster). The seed alone decides the result, whatever the parallelism.",
    ),
    ray: Optional[str] = typer.Option(
        None, "--ray", metavar="ADDRESS", help="Score candidates in Ray actors: the address of a running cluster (auto, "
        "ray://head:10001, host:6379; its nodes must see the pool's paths), or local to start Ray on this machine. Needs mlc[ray].",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    json_output: bool = json_option(),
) -> None:
    """Search linear merge weights (non-negative, summing to 1) over a pool against your objectives."""
    import json

    from mlc import console, options
    from mlc.commands.merge import search as S
    from mlc.errors import MlcError, ValidationError
    from mlc.runs import open_run
    from mlc.runs.refs import resolve

    root = options.get().runs_dir
    problems: list[str] = []
    if optimizer not in ("cmaes", "nsga2"):
        problems.append(f"--optimizer {optimizer!r} is not cmaes or nsga2")
    if trials < 1:
        problems.append("--trials must be at least 1")
    if workers < (0 if ray else 1):
        problems.append(f"--workers must be at least {0 if ray else 1}")
    if ray is not None:
        from mlc.distributed.ray import require

        try:
            require()
        except MlcError as e:
            problems.append(e.one_line())
    if out.exists() and not overwrite:
        problems.append(f"output {out} already exists (pass --overwrite to replace it)")
    paths = []
    for ref in pool:
        try:
            paths.append(resolve(ref, root).path)
        except MlcError as e:
            problems.append(e.message)
    objectives: list[Any] = []
    if len(paths) == len(pool):
        try:
            S.check_pool(paths, root)
            from mlc.models.tokenizer import load_tokenizer

            objectives = S.parse_objectives(objective, load_tokenizer(paths[0]), problems)
        except ValidationError as e:
            problems += e.problems
        except MlcError as e:
            problems.append(e.one_line())
    if problems:
        raise ValidationError(problems, what="merge search")
    config = {
        "pool": [str(p) for p in paths], "objectives": objective, "optimizer": optimizer, "trials": trials, "time_budget": time_budget,
        "seed": seed, "context": context, "workers": workers, "ray": ray,
    }
    as_json = options.want_json(json_output)
    with open_run("merge-search", config=config) as run:
        for ref in pool:
            run.add_input(ref, role="pool")
        for o in objectives:
            run.add_input(str(o.path), role=f"objective:{o.name}")
        def on_trial(row: dict[str, Any]) -> None:
            run.log_metrics({"trial": row["trial"], "kind": row["kind"], "macro": row["macro"], **{f"loss/{k}": v for k, v in row["losses"].items()}})
            if not as_json:
                console.info(f"trial {row['trial']:3d} {row['kind']:<18} macro loss {row['macro']:.4f}  " + "  ".join(f"{k} {v:.4g}" for k, v in row["values"].items()))

        result = S.search(paths, objectives, optimizer, trials, time_budget, seed, context, on_trial, workers, ray)
        best = result.trials[result.best]
        from mlc.commands.merge.api import plan_merge, write_model

        merge_config = {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, best["weights"])]}
        plan = plan_merge(merge_config, root)
        import yaml

        try:
            with run.artifact("model", kind="model", out=out, overwrite=overwrite, meta={"search": "linear", "weights": best["weights"]}) as staging:
                write_model(plan, staging, config_text=yaml.safe_dump(merge_config, sort_keys=False))
        finally:
            plan.close()
        with run.artifact("search", kind="search") as staging:
            (staging / "trials.json").write_text(json.dumps(result.trials, indent=2) + "\n")
            front = [result.trials[i] for i in result.front]
            (staging / "pareto.json").write_text(json.dumps({"objectives": result.objectives, "front": front}, indent=2) + "\n")
            S.plot(result, objectives, staging / "pareto.png")
        summary = S.macro_summary(result)
        run.set_summary(**summary)
    if as_json:
        console.print_json({"out": str(out.absolute()), "run": run.id, "search_dir": str(run.path / "artifacts" / "search"), **summary})
    else:
        console.info(
            f"best macro loss {summary['best_macro_loss']:.4f} (uniform {summary['uniform_macro_loss']:.4f}, best single {summary['best_pool_macro_loss']:.4f}); "
            f"weights {summary['best_weights']}; merge in {out}, trials and Pareto front in {run.path / 'artifacts' / 'search'}"
        )
