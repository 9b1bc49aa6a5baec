"""convert: open SRC in its format, stream every tensor into the target format's writer, inside a recorded run."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from mlc import console
from mlc.errors import MlcUsageError
from mlc.io.formats import HF, ConvertOptions

# Options that only some targets use: giving one to another target is an error, never silently ignored.
# (--spec is checked once the source is open: it also tells how a tp source combines.)
TARGET_OPTIONS = {"max_shard_bytes": {"hf"}, "quant": {"gguf"}, "tp": {"tp"}}
OPTION_FLAGS = {"max_shard_bytes": "--max-shard-size", "quant": "--quant", "tp": "--tp"}


def check_options(to: str, given: dict[str, Any]) -> None:
    for key, value in given.items():
        if value is not None and to not in TARGET_OPTIONS[key]:
            raise MlcUsageError(f"{OPTION_FLAGS[key]} applies to --to {'/'.join(sorted(TARGET_OPTIONS[key]))}, not --to {to}", f"drop {OPTION_FLAGS[key]}")


def convert(src: str, to: str, out: Path, source_format: str | None, options: ConvertOptions, overwrite: bool) -> dict[str, Any]:
    """Convert src into out (written atomically as the run's artifact); returns what the command reports."""
    from mlc import options as global_options
    from mlc.commands.checkpoint.sources import open_checkpoint, record_input, resolve_source, writer_for
    from mlc.io.formats import get_format
    from mlc.runs import open_run

    writer = writer_for(to)
    config = {"src": src, "to": to, "out": str(out), "from": source_format, **{k: v for k, v in options.__dict__.items() if k != "extra"}}
    with open_run("checkpoint", config) as run:
        path = resolve_source(src, global_options.get().runs_dir)
        record_input(run, path)
        started = time.perf_counter()
        legacy = get_format(source_format) if source_format else None
        if legacy is not None and not callable(getattr(legacy, "open", None)) and to == HF:
            # A plugin written against the first contract: it converts to hf in one call.
            from mlc.models.config import parse_dtype

            with run.artifact("model", kind="model", out=out, overwrite=overwrite, meta={"from": legacy.name, "to": to}) as staging:
                legacy.to_hf(path, staging, dtype=parse_dtype(options.dtype))
            fmt_name, n_tensors = legacy.name, None
        else:
            ckpt = open_checkpoint(path, source_format, options)
            fmt_name = ckpt.format
            if options.spec and "tp" not in (to, fmt_name):
                ckpt.close()
                raise MlcUsageError("--spec applies to tensor-parallel shards (--to tp, or a tp source)", "drop --spec")
            console.info(f"converting {ckpt.path} ({fmt_name}) to {to}")
            entries = ckpt.tensors()
            if options.with_optimizer and not any(e.is_optimizer for e in entries):
                raise MlcUsageError(f"{ckpt.path} holds no optimizer state", "drop --with-optimizer")
            n_tensors = sum(1 for e in entries if options.with_optimizer or not e.is_optimizer)
            meta = {"from": fmt_name, "to": to, "step": ckpt.info.get("step"), "with_optimizer": options.with_optimizer}
            kind = "model" if to in (HF, "gguf") else "checkpoint"
            total = sum(e.numel for e in entries if options.with_optimizer or not e.is_optimizer)
            try:
                with run.artifact("model" if kind == "model" else "checkpoint", kind=kind, out=out, overwrite=overwrite, meta=meta) as staging, \
                        progress(total) as advance:
                    writer.write(Counted(ckpt, advance), staging, options)
            finally:
                ckpt.close()
        seconds = time.perf_counter() - started
        result = {"run": run.id, "from": fmt_name, "to": to, "out": str(out.absolute()), "tensors": n_tensors, "seconds": round(seconds, 2)}
        run.set_summary(**{k: v for k, v in result.items() if k != "run"})
    return result


class Counted:
    """The opened checkpoint, reporting each tensor it hands out to a progress callback."""

    def __init__(self, ckpt: Any, advance: Callable[[int], None]):
        self._ckpt, self._advance = ckpt, advance
        self.format, self.path, self.config, self.assets, self.info = ckpt.format, ckpt.path, ckpt.config, ckpt.assets, ckpt.info

    def tensors(self) -> list[Any]:
        return self._ckpt.tensors()

    def read(self, name: str) -> Any:
        t = self._ckpt.read(name)
        self._advance(t.numel())
        return t

    def close(self) -> None:
        self._ckpt.close()


@contextlib.contextmanager
def progress(total: int) -> Iterator[Callable[[int], None]]:
    """advance(elements): a rich bar on a terminal, a plain line every 25% on stderr otherwise."""
    if console.progress_enabled():
        from rich.progress import BarColumn, Progress, TimeRemainingColumn

        with Progress("converting", BarColumn(), "{task.percentage:>3.0f}%", TimeRemainingColumn(), console=console.err, transient=True) as bar:
            task = bar.add_task("convert", total=total)
            yield lambda n: bar.advance(task, n)
        return
    done, shown = [0], [0]

    def advance(n: int) -> None:
        done[0] += n
        quarter = min(4, done[0] * 4 // max(total, 1))
        if quarter > shown[0]:
            shown[0] = quarter
            console.info(f"converted {25 * quarter}% of the weights")

    yield advance
