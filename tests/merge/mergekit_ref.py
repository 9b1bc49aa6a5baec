"""mergekit (a dev dependency) as the reference: run its merges in this process, compare outputs bit for bit.

mergekit's import costs seconds, so it happens once, on first use, and each reference merge is cached
by its config. Both tools read the same YAML mapping; model paths are absolute.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from .tiny import load


class Mergekit:
    def __init__(self, root: Path):
        pytest.importorskip("mergekit", reason="mergekit (the reference) is in the dev extra")
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        logging.getLogger("mergekit").setLevel(logging.ERROR)
        self._run, self._config, self._options = run_merge, MergeConfiguration, MergeOptions
        self.root = root
        self.done: dict[str, Path] = {}

    def merge(self, config: dict[str, Any], seed: int = 0) -> Path:
        """mergekit's output directory for this config (merged once)."""
        key = json.dumps(config, sort_keys=True) + f"/{seed}"
        if key not in self.done:
            out = self.root / f"mergekit-{len(self.done)}"
            self._run(self._config.model_validate(config), str(out), self._options(random_seed=seed, quiet=True, write_model_card=False))
            self.done[key] = out
        return self.done[key]


def assert_identical(got_dir: Path, want_dir: Path, rename: dict[str, str] | None = None) -> None:
    """Same tensor names, dtypes, shapes and bits (NaNs equal to NaNs)."""
    got, want = load(got_dir), load(want_dir)
    if rename:
        want = {rename.get(k, k): v for k, v in want.items()}
    assert sorted(got) == sorted(want)
    differ = []
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), (name, g.dtype, w.dtype, g.shape, w.shape)
        if not torch.equal(g.view(torch.uint8) if g.numel() else g, w.view(torch.uint8) if w.numel() else w):
            diff = (g.double() - w.double()).abs()
            differ.append(f"{name}: {int((diff > 0).sum())} of {g.numel()} differ, max {float(diff.max()):.3g}")
    assert not differ, "\n".join(differ)
