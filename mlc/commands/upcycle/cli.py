"""Turn a dense checkpoint (or several fine-tunes of it) into a Mixture-of-Experts model."""

from __future__ import annotations

from typing import List, Optional

import typer

from mlc.cliutil import new_app

app = new_app("Turn a dense checkpoint (or several fine-tunes of it) into a Mixture-of-Experts model.")


@app.command()
def upcycle(
    base: str = typer.Argument(..., help="Dense model directory or reference (run:<id>, latest:merge): Llama, Mistral or Qwen2."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output directory [default: the run's artifacts/model]."),
    experts: int = typer.Option(..., "--experts", "-E", help="Experts per layer (E >= top-k)."),
    top_k: int = typer.Option(..., "--top-k", "-k", help="Experts each token is routed to."),
    shared_expert: bool = typer.Option(
        False, "--shared-expert", help="Write Qwen2-MoE with a shared expert (the dense MLP) instead of Mixtral."
    ),
    drop_ratio: float = typer.Option(
        0.0, "--drop-ratio", help="Drop-Upcycling: per expert, re-initialise this fraction of the intermediate neurons from N(mean, std) of the dense weight."
    ),
    expert_source: List[str] = typer.Option(
        [], "--expert-source", help="Repeatable: fine-tunes of BASE to take experts from (expert i copies source i mod S)."
    ),
    shared_merge: Optional[str] = typer.Option(
        None, "--shared-merge", help="Merge method (any `mlc merge` method) for attention, norms and embeddings from the sources [default: BASE's]."
    ),
    merge_param: List[str] = typer.Option([], "--merge-param", help="Repeatable KEY=VALUE parameter of --shared-merge (weight defaults to 1/S for each source)."),
    router: str = typer.Option("random", "--router", help="Router init: random (seeded N(0, 0.02)), hidden or cheap_embed (from --expert-prompts)."),
    expert_prompts: Optional[str] = typer.Option(
        None, "--expert-prompts", help="YAML/JSON with positive (and negative) prompts per expert, for --router hidden or cheap_embed."
    ),
    routing: str = typer.Option(
        "topk-softmax",
        "--routing",
        help="topk-softmax (renormalised top-k weights) keeps the dense model's function exactly while the experts are "
        "identical; softmax-topk (needs --shared-expert) leaves the top-k probabilities unnormalised and scales the experts "
        "by Megatron's (E*G^2/k)^(1/3) (G=1), which matches the dense output's magnitude only approximately.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random router and Drop-Upcycling draws."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype: float32, bfloat16, float16 [default: BASE's]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
) -> None:
    """Upcycle BASE into a Mixtral (or, with --shared-expert, Qwen2-MoE) model that loads in transformers and mlc.

    Every expert starts as a copy of the dense MLP (sparse upcycling); every other weight is copied.
    All inputs are checked before any work, every problem is listed, and nothing is left behind on failure.
    """
    from mlc import console, options
    from mlc.commands.upcycle.options import UpcycleOptions
    from mlc.commands.upcycle.upcycle import run_upcycle

    opts = UpcycleOptions(
        base=base,
        out=out,
        experts=experts,
        top_k=top_k,
        shared_expert=shared_expert,
        drop_ratio=drop_ratio,
        expert_sources=list(expert_source),
        shared_merge=shared_merge,
        merge_params=list(merge_param),
        router=router,
        expert_prompts=expert_prompts,
        routing=routing,
        seed=seed,
        dtype=dtype,
        overwrite=overwrite,
    )
    result = run_upcycle(opts)
    if options.want_json(json_output):
        console.print_json(result.to_dict())
        return
    console.info(
        f"upcycled into {result.layout} with {result.experts} experts (top-{result.top_k}): "
        f"{result.bytes / 2**20:.0f} MiB in {result.seconds:.1f} s, run {result.run_id}"
    )
    console.out.print(str(result.out))
