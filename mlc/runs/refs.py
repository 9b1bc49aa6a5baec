"""Artifact references: a path, run:<id>, run:<id>/<artifact>, latest:<command>[/<artifact>], or a Hub id
(org/name[@revision], through huggingface_hub's cache: mlc.io.hub)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlc.errors import InputError
from mlc.io.hub import HubModel, is_hub_id, resolve_hub
from mlc.runs import index
from mlc.runs.record import read_run


@dataclass(frozen=True)
class ResolvedRef:
    path: Path
    run_id: str | None = None
    artifact: str | None = None
    hub: HubModel | None = None  # set for a Hub id: the repository, revision and commit read


def is_ref(text: str) -> bool:
    return text.startswith(("run:", "latest:"))


def resolve(ref: str, runs_root: Path) -> ResolvedRef:
    """Turn a reference into an existing path (with its producing run when known)."""
    if ref.startswith("run:"):
        run_part, _, artifact = ref[4:].partition("/")
        return _artifact_of(find_run(runs_root, run_part), artifact or None, ref)
    if ref.startswith("latest:"):
        command, _, artifact = ref[7:].partition("/")
        runs = index.query_runs(runs_root, command=command, status="completed")
        runs = [r for r in runs if r.get("artifacts")]
        if not runs:
            raise InputError(f"no completed {command} run with an artifact under {runs_root}", "list runs with `mlc runs ls`")
        return _artifact_of(Path(runs[0]["path"]), artifact or None, ref)
    path = Path(ref).expanduser()
    if not path.exists() and is_hub_id(ref):  # a local path of the same shape wins, as in transformers
        hub = resolve_hub(ref)
        return ResolvedRef(hub.path, hub=hub)
    if not path.exists():
        if "/" not in ref and any(_names_run(p, ref) for p in index.run_dirs(runs_root)):
            # A bare run id is not taken as a run on a guess (a file of that name may appear later): say how.
            raise InputError(f"{ref} is not a path, but it is a run id", f"refer to the run as run:{ref}")
        raise InputError(f"{ref} does not exist", "give a path, a Hub id (org/name), or a reference like run:<id>/<artifact> or latest:<command>")
    return ResolvedRef(path.absolute())


def find_run(runs_root: Path, key: str) -> Path:
    """A run directory by full id, short id, or unique prefix."""
    if not key:
        raise InputError("empty run id in reference", "use run:<id>, e.g. run:3fa2c1")
    candidates = [p for p in index.run_dirs(runs_root) if _names_run(p, key) or p.name.startswith(key)]
    exact = [p for p in candidates if _names_run(p, key)]
    if len(exact) == 1:
        return exact[0]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise InputError(f"no run {key!r} under {runs_root}", "list runs with `mlc runs ls`")
    raise InputError(f"run id {key!r} is ambiguous ({len(candidates)} runs match)", "give more of the id")


def _names_run(run_dir: Path, key: str) -> bool:
    """key is the run's full id or its short id (the part after the last dash)."""
    return run_dir.name == key or run_dir.name.endswith("-" + key)


def _artifact_of(run_path: Path, artifact: str | None, ref: str) -> ResolvedRef:
    record = read_run(run_path)
    artifacts = record.data.get("artifacts", {})
    if artifact is None:
        if len(artifacts) == 1:
            artifact = next(iter(artifacts))
        elif "model" in artifacts:
            artifact = "model"
        elif not artifacts:
            raise InputError(f"run {record.id} has no artifacts ({record.status})", "pick a run that finished making one")
        else:
            raise InputError(f"run {record.id} has several artifacts: {', '.join(artifacts)}", f"say which, e.g. {ref}/{next(iter(artifacts))}")
    if artifact not in artifacts:
        names = ", ".join(artifacts) or "none"
        raise InputError(f"run {record.id} has no artifact {artifact!r}", f"its artifacts: {names}")
    manifest = run_path / "artifacts" / artifact / "manifest.json"
    if not manifest.is_file():
        raise InputError(f"artifact {artifact!r} of run {record.id} is incomplete (no manifest)", "rerun the command that makes it")
    path = Path(json.loads(manifest.read_text())["path"])
    if not path.exists():
        raise InputError(f"artifact {artifact!r} of run {record.id} was at {path}, which no longer exists", "it was moved or deleted")
    return ResolvedRef(path, record.id, artifact)
