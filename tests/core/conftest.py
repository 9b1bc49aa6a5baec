"""Fixtures for the foundation tests: running the real CLI in subprocesses, and a plugin package
installed with pip from a temporary directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PLUGIN_PYPROJECT = """
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "mlc-hello"
version = "0.3.1"

[project.entry-points."mlc.commands.v1"]
hello = "mlc_hello.cli:app"
nap = "mlc_hello.nap:app"
broken = "mlc_hello.broken:app"
shout = "mlc_hello.loud.cli:app"

[project.entry-points."mlc.merge_methods.v1"]
elementwise_max = "mlc_hello.methods:elementwise_max"
plain_max = "mlc_hello.methods:plain_max"

[project.entry-points."mlc.quant_schemes.v1"]
not_a_scheme = "mlc_hello.methods:plain_max"
"""

PLUGIN_FILES = {
    "mlc_hello/__init__.py": "",
    "mlc_hello/cli.py": '''
        """Say hello from a third-party plugin."""
        import typer

        app = typer.Typer()


        @app.command()
        def hello(name: str = "world") -> None:
            """Greet someone."""
            print(f"hello {name}")
    ''',
    "mlc_hello/nap.py": '''
        """Open a run, write a progress file, then sleep (for kill and Ctrl-C tests)."""
        import time
        from pathlib import Path

        import typer

        app = typer.Typer()


        @app.command()
        def nap(seconds: float = 60.0, marker: Path = Path("started")) -> None:
            """Sleep inside a run."""
            from mlc.runs import open_run

            with open_run("nap", config={"seconds": seconds}) as run:
                marker.write_text(run.id)
                time.sleep(seconds)
    ''',
    "mlc_hello/loud/cli.py": '''
        """Shout, from a folder without __init__.py (a namespace package)."""
        import typer

        app = typer.Typer()


        @app.command()
        def shout(word: str = "hey") -> None:
            print(word.upper())
    ''',
    "mlc_hello/broken.py": '''
        """A plugin whose import fails."""
        raise ImportError("this plugin is broken on purpose")
    ''',
    "mlc_hello/methods.py": '''
        """A third-party merge method, declared through the public contract; and a plain function that is not one."""
        from mlc.contracts import merge_method


        @merge_method("elementwise_max", base="input", min_models=1)
        def elementwise_max(models, base, params, rng=None):
            """The largest value at each position."""
            import torch

            return torch.stack(models).amax(dim=0)


        def plain_max(tensors, base=None, **params):
            import torch

            return torch.stack(list(tensors)).amax(dim=0)
    ''',
}


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site directory holding the mlc-hello plugin, installed by pip from a temporary source tree."""
    src = tmp_path_factory.mktemp("mlc-hello-src")
    (src / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    for rel, text in PLUGIN_FILES.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(textwrap.dedent(text).lstrip())
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(src)],
        check=True,
        capture_output=True,
    )
    return site


def run_mlc(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real `mlc` entry point in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mlc", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout
    )


def imported_modules(args: list[str], env: dict[str, str] | None = None) -> tuple[set[str], subprocess.CompletedProcess]:
    """Run the CLI with args in a fresh interpreter and return the modules it had imported at exit."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"mlc-modules-{os.getpid()}-{abs(hash(tuple(args)))}.json"
    code = (
        "import atexit, json, pathlib, sys\n"
        f"atexit.register(lambda: pathlib.Path({str(out)!r}).write_text(json.dumps(sorted(sys.modules))))\n"
        "from mlc.cli import main\n"
        f"main({args!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60)
    assert out.exists() and out.stat().st_size, f"mlc {args} wrote no module list (exit {proc.returncode}): {proc.stderr[-2000:]}"
    modules = set(json.loads(out.read_text()))
    out.unlink()
    return modules, proc
