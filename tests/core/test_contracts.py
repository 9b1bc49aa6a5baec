"""The public plugin contracts: importable without torch, checked at discovery, enforced where used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch


def test_importing_the_contracts_imports_no_torch_and_no_command():
    code = "import sys, mlc.contracts; print(sorted(m for m in sys.modules if m.startswith(('torch', 'mlc.commands'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_every_builtin_plugin_implements_its_kinds_contract():
    from mlc import plugins
    from mlc.contracts import plugin_problem

    for kind in plugins.GROUPS:
        for plugin in plugins.discover(kind):
            if plugin.package == "mlc":
                assert plugin_problem(kind, plugin.load()) is None, plugin.name


def test_a_format_that_cannot_open_or_convert_is_not_a_checkpoint_format():
    from mlc.contracts import ConvertOptions, plugin_problem

    class HalfFormat:
        name, description = "half", "detects but cannot read"

        def detect(self, path: Path) -> bool:
            return False

    class ReadingFormat(HalfFormat):
        def open(self, path: Path, options: ConvertOptions) -> None: ...

    class FirstContractFormat(HalfFormat):  # the first format contract: to_hf only
        def to_hf(self, src: Path, out_dir: Path, dtype: torch.dtype | None = None) -> None: ...

    assert plugin_problem("formats", ReadingFormat()) is None
    assert plugin_problem("formats", FirstContractFormat()) is None
    assert plugin_problem("formats", HalfFormat()) == "a HalfFormat is not a CheckpointFormat: it has no open()"
    assert plugin_problem("formats", object()) == (
        "a object is not a CheckpointFormat: it has no name, description, detect(), open()"
    )


def test_storing_a_weight_of_a_kind_no_layout_knows_is_a_clear_error():
    from dataclasses import dataclass

    from mlc.errors import MlcError
    from mlc.io.quant_format import spec_of

    @dataclass
    class TernaryWeight:  # what a third-party scheme might return
        q: torch.Tensor

    with pytest.raises(MlcError, match="returned a TernaryWeight, which no mlc layout stores"):
        spec_of(TernaryWeight(torch.zeros(2, 2)))
