"""The checkpoint manager: torch.distributed.checkpoint step directories that count only once complete.

    <root>/step-00000040/   .metadata + __*.distcp   model and optimizer state (DCP: re-shards on load to any world size)
                            rng-rank<r>.pt           every RNG of process r (torch, CUDA, numpy, python)
                            trainer.json             the step, the data position, the world size, what the caller adds
                            COMPLETE                 written by rank 0 after every process finished: the step counts

A kill at any moment leaves the previous complete step untouched (a new step is written into a new directory, and
old ones are pruned only after the new one is complete), so `latest()` always finds a loadable checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from mlc.distributed import dist as mdist
from mlc.distributed import faults
from mlc.errors import InputError, MlcError
from mlc.io.atomic import atomic_write_json

MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d+)$")


class TrainState(Stateful):
    """Model and optimizers as DCP sees them: fully qualified names, sharded or not, loadable on any world size."""

    def __init__(
        self, model: nn.Module, optimizers: list[torch.optim.Optimizer], trainable_only: bool = False,
        extra: dict[str, Stateful] | None = None,
    ):
        self.model, self.optimizers = model, optimizers
        # LoRA: the frozen base weights come from the base model on resume, so only trainable tensors are saved.
        self.options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
        self.extra = dict(extra or {})  # more state saved with the model (weight averages), under its own key

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizers, options=self.options)
        return {"model": model_sd, "optim": optim_sd, **{k: v.state_dict() for k, v in self.extra.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        built = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in self.optimizers]
        set_state_dict(self.model, self.optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"], options=self.options)
        # Parameter groups are matched by the names of their parameters. Saved under another layout (tensor
        # parallelism splits groups by device mesh) a group may find no saved counterpart and lose its settings: those
        # come from the config, as built; how the update runs (fused, foreach) always follows this process's layout.
        for opt, groups in zip(self.optimizers, built):
            for group, settings in zip(opt.param_groups, groups):
                group.update({k: v for k, v in settings.items() if k in ("fused", "foreach") or k not in group})
        for key, part in self.extra.items():
            part.load_state_dict(state[key])


class CheckpointError(MlcError):
    """A checkpoint that could not be written (its partial step directory is removed)."""


def state_bytes(state: TrainState, rank: int) -> int:
    """Bytes this rank writes for the state: its DTensor shards, and replicated tensors on rank 0 only (as DCP does)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for value in _tensors(state.state_dict()):
        if isinstance(value, DTensor):
            total += value.to_local().nbytes
        elif rank == 0:
            total += value.nbytes
    return total


def _tensors(tree: Any):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def no_space(error: BaseException) -> bool:
    """Whether an error (or what it wraps: a DCP CheckpointException holds every rank's) is a full disk."""
    seen: list[BaseException] = [error]
    while seen:
        e = seen.pop()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, CheckpointException):
            seen.extend(exc for exc, _ in e.failures.values())
        seen.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return "No space left on device" in str(error)


def describe(error: BaseException) -> str:
    if isinstance(error, CheckpointException):
        first = next(iter(error.failures.values()))[0]
        return describe(first)
    text = (str(error).splitlines() or [""])[0]
    return f"{type(error).__name__}: {text}"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, keep_last_k: int = 2, async_save: bool = False):
        """async_save: `save` returns once the state is copied to host memory and writes it in the background
        (mlc.distributed.async_save); every process creates its manager at the same point (a collective)."""
        self.root = Path(root)
        self.keep_last_k = keep_last_k
        self.writer = None
        if async_save:
            from mlc.distributed.async_save import AsyncWriter

            self.writer = AsyncWriter()
        self._state: TrainState | None = None

    # ---- finding ------------------------------------------------------------------------------------------------
    def steps(self, complete_only: bool = True) -> list[tuple[int, Path]]:
        """(step, directory) pairs, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            m = STEP_DIR.match(path.name)
            if m and path.is_dir() and (not complete_only or (path / MARKER).is_file()):
                found.append((int(m.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete step directory, or None."""
        found = self.steps()
        return found[-1][1] if found else None

    def step_dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    # ---- saving -------------------------------------------------------------------------------------------------
    def save(self, step: int, state: TrainState, trainer: dict[str, Any]) -> Path:
        """Write step `step` from every process; returns its directory once complete (all ranks return together)."""
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        path = self.step_dir(step)
        error: BaseException | None = None
        self.wait()
        if rank == 0:
            try:
                if path.exists():  # left over from a save that was killed: never complete, so never loaded
                    shutil.rmtree(path)
                path.mkdir(parents=True)
            except OSError as e:
                error = e
        mdist.barrier()
        if error is None and self.writer is not None:
            return self._save_async(path, step, state, trainer, rank, world)
        if error is None:
            try:
                with warnings.catch_warnings():  # a lone process saves without a process group, as intended
                    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                    dcp.save({"train": state}, checkpoint_id=str(path))
                torch.save(rng_state(), path / f"rng-rank{rank}.pt")
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - every rank must learn of any rank's failure
                error = e
        faults.maybe_kill("in-save", step)
        if error is None and rank == 0:
            try:
                atomic_write_json(path / "trainer.json", {**trainer, "step": step, "world_size": world})
            except OSError as e:
                error = e
        self._abandon_if_any_failed(path, state, error)
        if rank == 0:
            # The marker makes the step count; written last, after every rank's files are in place.
            atomic_write_json(path / MARKER, {"step": step, "world_size": world})
            self.prune()
        mdist.barrier()
        return path

    def _save_async(self, path: Path, step: int, state: TrainState, trainer: dict[str, Any], rank: int, world: int) -> Path:
        """Stage the tensors now and write everything in the background; the marker follows there (rank 0).

        The RNG states and the trainer record describe this step: taken now, written in the background with the
        tensors (their fsync no longer blocks the loop)."""
        rng, record = rng_state(), {**trainer, "step": step, "world_size": world}

        def finalize() -> None:
            error: BaseException | None = None
            try:
                torch.save(rng, path / f"rng-rank{rank}.pt")
                if rank == 0:
                    atomic_write_json(path / "trainer.json", record)
            except OSError as e:
                error = e
            if self.writer.any_failed(error):  # every rank's small files are in place before the marker, or none is
                raise error or CheckpointError(f"another process could not write its part of checkpoint {path}")
            faults.maybe_kill("in-save", step)
            if rank == 0:
                atomic_write_json(path / MARKER, {"step": step, "world_size": world})
                self.prune()

        self._state = state
        self.writer.start(path, state, finalize)
        return path

    def wait(self) -> Path | None:
        """Finish the background write in flight, if any (every process calls this at the same point); returns its
        directory, complete. A failed write is removed and raised as CheckpointError on every process."""
        if self.writer is None:
            return None
        path, error = self.writer.wait()
        self._abandon_if_any_failed(path, self._state, error)
        return path

    def close(self) -> None:
        """Finish any background write and release the staging buffers (every process)."""
        self.wait()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _abandon_if_any_failed(self, path: Path, state: TrainState, error: BaseException | None) -> None:
        """Every rank reports whether its part failed; if any did, all abandon the step together."""
        failed = mdist.all_reduce_sum(torch.tensor([float(error is not None)], device=mdist.collective_device()))
        if failed.item():
            self._abandon(path, state, error)

    def _abandon(self, path: Path, state: TrainState, error: BaseException | None) -> None:
        """Remove a step that some rank could not write and raise one error for it (every rank calls this)."""
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        needed = mdist.all_reduce_sum(torch.tensor([float(state_bytes(state, rank))], device=mdist.collective_device())).item()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)  # a partial step would keep the disk full and never load
        mdist.barrier()
        latest = self.latest()
        kept = f"{latest.name} is intact" if latest is not None else "no earlier checkpoint exists"
        if error is None or no_space(error):
            free = shutil.disk_usage(self.root).free
            raise CheckpointError(
                f"no space left on the device to write checkpoint {path}: it needs about {fmt_bytes(needed)}, "
                f"{fmt_bytes(free)} are free there (the partial step was removed; {kept})",
                "free space on that disk, lower checkpoint.keep_last_k, or checkpoint less often (checkpoint.interval)",
            )
        raise CheckpointError(f"could not write checkpoint {path}: {describe(error)} (the partial step was removed; {kept})")

    def prune(self) -> None:
        """Keep the newest keep_last_k complete steps; drop older ones and unfinished leftovers older than the newest."""
        complete = self.steps()
        if not complete:
            return
        newest = complete[-1][0]
        doomed = complete[: -self.keep_last_k] if self.keep_last_k > 0 else []
        doomed += [(s, p) for s, p in self.steps(complete_only=False) if s < newest and not (p / MARKER).is_file()]
        for _, p in doomed:
            # Remove the marker first: a kill midway leaves an incomplete directory, never a damaged complete one.
            (p / MARKER).unlink(missing_ok=True)
            shutil.rmtree(p, ignore_errors=True)

    # ---- loading ------------------------------------------------------------------------------------------------
    def load(self, path: Path, state: TrainState) -> dict[str, Any]:
        """Load model and optimizer state (re-sharded to this world size); returns trainer.json plus `rng_restored`.

        RNG states are per process: restored when the world size is unchanged, else left to the caller to re-seed.
        """
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        for key in state.extra:  # e.g. weight averages switched on for a run that was saved without them
            if not any(k.startswith(f"train.{key}.") for k in saved):
                raise InputError(
                    f"{key}: the checkpoint {path} holds no {key} state (it was saved with other settings)",
                    "resume with the settings the run was started with, or start a new run (checkpoint.resume=none)",
                )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"train": state}, checkpoint_id=str(path))
        trainer = json.loads((path / "trainer.json").read_text())
        rng_file = path / f"rng-rank{rank}.pt"
        trainer["rng_restored"] = trainer["world_size"] == world and rng_file.is_file()
        if trainer["rng_restored"]:
            set_rng_state(torch.load(rng_file, weights_only=False))
        return trainer
