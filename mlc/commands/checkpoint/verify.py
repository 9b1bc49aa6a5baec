"""verify: is a checkpoint complete and undamaged? Each problem is one line naming the file.

Checks, in order: the COMPLETE marker (dcp); the file hashes of mlc's manifest (the run artifact that wrote the
directory, found through its provenance file) or, for DCP chunks, the CRC-32s inside them; then every tensor read
in full and found finite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlc.errors import MlcError
from mlc.io.formats import ConvertOptions


def find_manifest(path: Path) -> Path | None:
    """mlc's manifest.json for the files at path: in the artifact record itself, or through mlc-provenance.json."""
    from mlc.runs.rundir import PROVENANCE_FILE

    if (path / "manifest.json").is_file():
        return path / "manifest.json"
    prov = path / PROVENANCE_FILE
    if prov.is_file():
        try:
            data = json.loads(prov.read_text())
            manifest = Path(data["run_path"]) / "artifacts" / data["artifact"] / "manifest.json"
        except (json.JSONDecodeError, KeyError, TypeError):
            return None
        if manifest.is_file() and Path(json.loads(manifest.read_text()).get("path", "")) == path.absolute():
            return manifest
    return None


def check_manifest(path: Path, manifest: Path) -> list[str]:
    from mlc.runs.hashing import file_sha256

    files: dict[str, Any] = json.loads(manifest.read_text()).get("files", {})
    problems = []
    for rel, meta in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            problems.append(f"{f} is missing (listed in {manifest})")
        elif f.stat().st_size != meta["size"]:
            what = "truncated" if f.stat().st_size < meta["size"] else "longer than written"
            problems.append(f"{f} is {what}: {f.stat().st_size} bytes, the manifest says {meta['size']}")
        elif file_sha256(f) != meta["sha256"]:
            problems.append(f"{f} changed since it was written (sha256 differs from {manifest.name})")
    return problems


def verify(path: Path, source_format: str | None) -> dict[str, Any]:
    """{"ok", "problems", "checked"}: problems is one line each."""
    import torch

    from mlc.commands.checkpoint.sources import open_checkpoint
    from mlc.io.checkpoints import dcp

    problems: list[str] = []
    checked: list[str] = []
    if dcp.is_step_dir(path) or (dcp.DCP.detect(path) and source_format in (None, "dcp")):
        step = dcp.step_dir_of(path)
        checked.append("complete marker")
        if not (step / dcp.MARKER).is_file():
            problems.append(f"{step / dcp.MARKER} is missing: the save of this step never finished")
        try:
            checked.append("chunk CRC-32s")
            problems += dcp.damaged_chunks(step)
        except MlcError as e:
            problems.append(e.one_line())
        path = step
    manifest = find_manifest(path) if path.is_dir() else None
    if manifest is not None:
        checked.append(f"hashes in {manifest}")
        problems += check_manifest(path, manifest)
    tensors = 0
    try:
        ckpt = open_checkpoint(path, source_format, ConvertOptions(with_optimizer=True))
    except MlcError as e:
        problems.append(e.one_line())
        return {"ok": False, "path": str(path), "problems": problems, "checked": checked}
    checked.append("every tensor readable and finite")
    try:
        for e in ckpt.tensors():
            try:
                t = ckpt.read(e.name)
            except MlcError as err:
                problems.append(err.one_line())
                break  # the file is damaged: the next tensors would repeat the same line
            tensors += 1
            if t.is_floating_point():
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    problems.append(f"{ckpt.path}: tensor {e.name!r} holds {bad} non-finite values (NaN or inf)")
    finally:
        ckpt.close()
    return {"ok": not problems, "path": str(path), "format": ckpt.format, "tensors": tensors, "problems": problems, "checked": checked}
