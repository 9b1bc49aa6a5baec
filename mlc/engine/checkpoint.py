"""The checkpoint manager: torch.distributed.checkpoint step directories that count only once complete.

    <root>/step-00000040/   .metadata + __*.distcp   model and optimizer state (DCP: re-shards on load to any world size)
                            rng-rank<r>.pt           every RNG of process r (torch, CUDA, numpy, python)
                            trainer.json             the step, the data position, the world size, what the caller adds
                            COMPLETE                 written by rank 0 after every process finished: the step counts

A kill at any moment leaves the previous complete step untouched (a new step is written into a new directory, and
old ones are pruned only after the new one is complete), so `latest()` always finds a loadable checkpoint.
"""

from __future__ import annotations

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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from mlc.engine import dist as mdist
from mlc.engine import faults
from mlc.io.atomic import atomic_write_json

MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d+)$")


class TrainState(Stateful):
    """Model and optimizers as DCP sees them: fully qualified names, sharded or not, loadable on any world size."""

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], trainable_only: bool = False):
        self.model, self.optimizers = model, optimizers
        # LoRA: the frozen base weights come from the base model on resume, so only trainable tensors are saved.
        self.options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizers, options=self.options)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"], options=self.options)


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
    def __init__(self, root: str | os.PathLike, keep_last_k: int = 2):
        self.root = Path(root)
        self.keep_last_k = keep_last_k

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
        if rank == 0:
            if path.exists():  # left over from a save that was killed: never complete, so never loaded
                shutil.rmtree(path)
            path.mkdir(parents=True)
        mdist.barrier()
        with warnings.catch_warnings():  # a lone process saves without a process group, as intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"train": state}, checkpoint_id=str(path))
        torch.save(rng_state(), path / f"rng-rank{rank}.pt")
        faults.maybe_kill("in-save", step)
        mdist.barrier()
        if rank == 0:
            atomic_write_json(path / "trainer.json", {**trainer, "step": step, "world_size": world})
            # The marker makes the step count; written last, after every rank's files are in place.
            atomic_write_json(path / MARKER, {"step": step, "world_size": world})
            self.prune()
        mdist.barrier()
        return path

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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"train": state}, checkpoint_id=str(path))
        trainer = json.loads((path / "trainer.json").read_text())
        rng_file = path / f"rng-rank{rank}.pt"
        trainer["rng_restored"] = trainer["world_size"] == world and rng_file.is_file()
        if trainer["rng_restored"]:
            set_rng_state(torch.load(rng_file, weights_only=False))
        return trainer
