"""average: the weights of several checkpoints averaged into one HF model (uniform, EMA or LAWA).

    uniform  sum_i x_i / n
    ema      x_ema = decay * x_ema + (1 - decay) * x_i over the inputs in step order, started at the first:
             weights decay^(n-1) for the first, (1 - decay) * decay^(n-1-i) for input i > 0
    LAWA     (Kaddour 2022; Sanyal et al. 2023) the uniform average of the last k checkpoints `spacing` steps
             apart: --last k --spacing s picks steps T, T-s, ..., T-(k-1)s of a run (T its newest complete step)

Streaming: each output tensor is accumulated in float32 from one input tensor at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlc.errors import InputError, MlcUsageError
from mlc.io.formats import ConvertOptions


def expand_sources(srcs: list[str], runs_root: Path, last: int | None, spacing: int | None) -> list[Path]:
    """Paths of the checkpoints to average: a run (run:<id> or its directory) stands for its complete steps."""
    from mlc.commands.checkpoint.sources import resolve_source
    from mlc.io.checkpoints.dcp import complete_steps
    from mlc.runs.refs import find_run

    if last is not None and len(srcs) != 1:
        raise MlcUsageError("--last picks steps of one run", "give one run:<id> (or run directory) with --last")
    paths: list[Path] = []
    for src in srcs:
        run = None
        if src.startswith("run:") and "@" not in src and "/" not in src:
            run = find_run(runs_root, src[4:])
        elif Path(src).is_dir() and (Path(src) / "checkpoints").is_dir():
            run = Path(src)
        steps = complete_steps(run / "checkpoints") if run is not None else []
        if run is not None and not steps:
            raise InputError(f"run {run.name} holds no complete checkpoint step", "train with checkpoint.interval set")
        if steps:
            if last is not None:
                newest = steps[-1][0]
                wanted = [newest - i * (spacing or 1) for i in range(last)][::-1]
                have = dict(steps)
                missing = [s for s in wanted if s not in have]
                if missing:
                    raise InputError(
                        f"run {run.name} has no complete step {missing[0]} (LAWA wants {', '.join(map(str, wanted))})",
                        f"its steps: {', '.join(str(s) for s, _ in steps)}; change --last/--spacing or keep more checkpoints (checkpoint.keep_last_k)",
                    )
                paths += [have[s] for s in wanted]
            else:
                paths += [p for _, p in steps]
        else:
            paths.append(resolve_source(src, runs_root))
    if len(paths) < 2:
        raise MlcUsageError(f"averaging needs at least two checkpoints, got {len(paths)}", "give more checkpoints, or a run with several steps")
    return paths


def weights_for(n: int, method: str, decay: float | None) -> list[float]:
    if method == "uniform":
        if decay is not None:
            raise MlcUsageError("--decay applies to --method ema", "drop --decay or use --method ema")
        return [1.0 / n] * n
    if method == "ema":
        if decay is None or not 0.0 < decay < 1.0:
            raise MlcUsageError("--method ema needs --decay between 0 and 1", "e.g. --decay 0.9")
        return [decay ** (n - 1)] + [(1 - decay) * decay ** (n - 1 - i) for i in range(1, n)]
    raise MlcUsageError(f"unknown --method {method!r}", "use uniform or ema (LAWA is uniform with --last/--spacing)")


def average_into(ckpts: list[Any], weights: list[float], out_dir: Path, dtype: str | None) -> None:
    """Write the weighted average of the opened checkpoints (same tensors, same shapes) as an HF directory."""
    import torch

    from mlc.io.checkpoints.base import Opened
    from mlc.io.checkpoints.hf import HF

    first = ckpts[0]
    names = {e.name: e for e in first.tensors() if not e.is_optimizer}
    for c in ckpts[1:]:
        other = {e.name: e for e in c.tensors() if not e.is_optimizer}
        if set(other) != set(names):
            diff = sorted(set(other) ^ set(names))
            raise InputError(f"{c.path} does not hold the same tensors as {first.path} (first difference: {diff[0]!r})", "average checkpoints of one model")
        bad = [n for n in names if other[n].shape != names[n].shape]
        if bad:
            raise InputError(f"{c.path}: tensor {bad[0]!r} has shape {other[bad[0]].shape}, {first.path} has {names[bad[0]].shape}", "average checkpoints of one model")

    def read(name: str) -> torch.Tensor:
        acc = None
        for c, w in zip(ckpts, weights):
            x = c.read(name).float()
            acc = x.mul_(w) if acc is None else acc.add_(x, alpha=w)
        return acc.to(getattr(torch, names[name].dtype))

    averaged = Opened("average", first.path, list(names.values()), read, first.config, first.assets, {"step": first.info.get("step")})
    if averaged.config is None:
        raise InputError(f"{first.path} carries no model config, which the averaged HF model needs", "average checkpoints of an mlc train run or HF directories")
    HF.write(averaged, out_dir, ConvertOptions(dtype=dtype))


def native_model(ckpt: Any) -> Any:
    """mlc's model with a checkpoint's weights (for perplexity), in float32."""
    import torch

    from mlc.models import build_model

    model = build_model(ckpt.config, dtype=torch.float32)
    state = {e.name: ckpt.read(e.name).float() for e in ckpt.tensors() if not e.is_optimizer}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise InputError(f"{ckpt.path} does not match its config (missing {missing[:2]}, unexpected {unexpected[:2]})", "the checkpoint and config.json disagree")
    model.tie_weights()
    return model.eval()


def perplexities(paths: list[Path], out_dir: Path, data: str, context: int) -> dict[str, float]:
    """Perplexity of each input and of the average, on the same tokens of data."""
    from mlc.commands.checkpoint.sources import open_checkpoint
    from mlc.io.texts import read_texts
    from mlc.models.evaluate import perplexity, tokenize_texts
    from mlc.models.tokenizer import load_tokenizer

    results = {}
    for path in [*paths, out_dir]:
        ckpt = open_checkpoint(path, None, ConvertOptions())
        try:
            if ckpt.assets is None:
                raise InputError(f"{path} has no tokenizer to evaluate with", "average checkpoints that carry their tokenizer")
            ids = tokenize_texts(load_tokenizer(ckpt.assets), read_texts(data))
            model = native_model(ckpt)
            results[str(path)] = perplexity(model, ids, context=min(context, ckpt.config.get("max_position_embeddings", context))).perplexity
        finally:
            ckpt.close()
    return results
