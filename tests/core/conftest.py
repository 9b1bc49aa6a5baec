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
        """A third-party merge method."""


        def elementwise_max(tensors, base=None, **params):
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
        "import atexit, json, sys\n"
        f"atexit.register(lambda: open({str(out)!r}, 'w').write(json.dumps(sorted(sys.modules))))\n"
        "from mlc.cli import main\n"
        f"main({args!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60)
    modules = set(json.loads(out.read_text()))
    out.unlink()
    return modules, proc


@pytest.fixture
def runs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "runs"
    monkeypatch.setenv("MLC_RUNS_DIR", str(root))
    monkeypatch.setenv("MLC_CACHE", str(tmp_path / "cache"))
    from mlc import options

    options.set_options(options.GlobalOptions(runs_dir=root))
    return root
