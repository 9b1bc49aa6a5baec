"""Which checkpoint SRC names, and in which format: paths, run:<id>, run:<id>@step-N, run:<id>/<artifact>.

`run:<id>` of a run that holds training checkpoints means its latest complete step (the dcp format);
`run:<id>@step-N` a given step; anything else resolves like every other mlc reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlc.errors import InputError, MlcUsageError
from mlc.io.checkpoints.base import Opened
from mlc.io.formats import ConvertOptions, can_write, describe_path, detect_format, get_format, installed_formats


def resolve_source(src: str, runs_root: Path) -> Path:
    """The file or directory SRC names."""
    from mlc.io.checkpoints.dcp import complete_steps
    from mlc.runs.refs import find_run, resolve

    if src.startswith("run:") and "/" not in src:
        key, _, step = src[4:].partition("@")
        run = find_run(runs_root, key)
        steps = complete_steps(run / "checkpoints")
        if step:
            wanted = step.removeprefix("step-")
            if not wanted.isdigit():
                raise MlcUsageError(f"{src}: {step!r} is not a step", "write run:<id>@step-N, e.g. run:3fa2c1@step-40")
            found = [p for s, p in steps if s == int(wanted)]
            if not found:
                have = ", ".join(str(s) for s, _ in steps) or "none"
                raise InputError(f"run {run.name} has no complete checkpoint at step {int(wanted)}", f"its complete steps: {have}")
            return found[0]
        if steps:
            return steps[-1][1]
    return resolve(src, runs_root).path


def open_checkpoint(path: Path, source_format: str | None, options: ConvertOptions) -> Opened:
    """Open path in the named format (checking that it looks like one) or in the one that recognises it."""
    if source_format:
        fmt = get_format(source_format)
        if not path.exists():
            raise InputError(f"{path} does not exist", "check the path")
        if not fmt.detect(path):
            others = [f.name for f in installed_formats().values() if f.name != fmt.name and f.detect(path)]
            looks = f"it looks like {others[0]}" if len(others) == 1 else describe_path(path)
            raise InputError(f"{path} is not a {fmt.name} checkpoint ({looks})", f"drop --from {fmt.name}" + (f" or pass --from {others[0]}" if others else ""))
    else:
        fmt = detect_format(path)
    if not callable(getattr(fmt, "open", None)):
        raise InputError(f"the {fmt.name} format plugin cannot be read tensor by tensor (it has no open())", "update the plugin")
    return fmt.open(path, options)


def writer_for(name: str) -> Any:
    formats = installed_formats()
    writable = ", ".join(sorted(n for n, f in formats.items() if can_write(f)))
    if name not in formats or not can_write(formats[name]):
        what = "cannot write" if name in formats else "knows no format"
        raise MlcUsageError(f"mlc {what} {name!r} as --to", f"formats it writes: {writable}")
    return formats[name]


def record_input(run: Any, path: Path) -> Path:
    """Record path as the run's input; a training step's producer is the train run whose checkpoints hold it."""
    from mlc.io.checkpoints.dcp import STEP_DIR, run_dir_of

    path = run.add_input(str(path), role="checkpoint")
    entry = run.data["inputs"][-1]
    if entry.get("producer_run") is None and STEP_DIR.match(path.name) and run_dir_of(path) is not None:
        entry["producer_run"], entry["producer_artifact"] = run_dir_of(path).name, f"checkpoints/{path.name}"
        run.save()
    return path
