"""The docs cannot rot: every runnable block in docs/ is run, and every `mlc` line anywhere in them must parse.

A fenced block whose info string is `bash runnable` is executed line by line (each line an `mlc` command, run
in-process through the real CLI, in the guide's own fresh directory); a block with `file=NAME` in its info string
(`toml file=sft.toml`) is written to NAME first, so the config a reader sees is the config that runs. Where the text
uses SmolLM2-135M-Instruct, the directory holds a tiny random Llama of mlc's bundled shape and tokenizer under the
same names (`smollm2/`, `SmolLM2-135M-Instruct.Q4_1.gguf`): docs/README.md says so to the reader.

The other `mlc` lines (servers that run until stopped, the real model's download) are checked against the CLI:
the command must exist and every option must be one it declares, so a renamed flag fails here too.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = REPO / "docs"
GUIDES = ["train", "checkpoint", "merge", "upcycle", "quantize", "serve", "bench", "eval", "runs"]
WALKTHROUGH = "walkthrough-smollm2"
SERVE_PORT = 18631  # the port docs/serve.md starts its server on
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)


def blocks(doc: Path) -> list[tuple[int, list[str], str]]:
    """(line number, info words, body) of every fenced block, in order."""
    text = doc.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1).split(), m.group(2)) for m in FENCE.finditer(text)]


def commands(body: str) -> list[list[str]]:
    """The shell lines of a block as argv lists: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for line in body.splitlines():
        line = pending + line
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


def mlc_lines(doc: Path) -> list[tuple[int, list[str]]]:
    return [(line, argv) for line, info, body in blocks(doc) if info[:1] in (["bash"], ["sh"], ["console"])
            for argv in commands(body) if argv[0] == "mlc"]


def test_every_guide_exists_has_runnable_blocks_and_the_readme_links_them():
    readme = (REPO / "README.md").read_text()
    for name in [*GUIDES, WALKTHROUGH]:
        doc = DOCS / f"{name}.md"
        assert doc.is_file(), doc
        assert f"docs/{name}.md" in readme, f"README.md does not link docs/{name}.md"
        runnable = [body for _, info, body in blocks(doc) if info[:2] == ["bash", "runnable"]]
        assert runnable and all(commands(b) for b in runnable), f"{doc.name} has no runnable block"


def _option_names(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *getattr(p, "secondary_opts", []))}


def cli_error(argv: list[str]) -> str | None:
    """Why `mlc ...` argv would not parse (an unknown command or option), or None. Arguments are not checked."""
    import click
    import typer

    from mlc.cli import app

    cmd, args, path = typer.main.get_command(app), argv[1:], ["mlc"]
    while isinstance(cmd, click.Group):
        while args and args[0].startswith("-"):  # global options before the command
            opt = args.pop(0).split("=")[0]
            if opt not in _option_names(cmd):
                return f"{' '.join(path)} has no option {opt}"
            if not any(opt in p.opts and (p.is_flag or p.count) for p in cmd.params):
                args.pop(0)
        if not args:
            return None
        try:  # how the CLI itself picks the subcommand (mlc's groups import theirs lazily, here)
            name, sub, args = cmd.resolve_command(click.Context(cmd), args)
        except click.UsageError as e:
            return f"{' '.join(path)}: {e.format_message()}"
        if sub is None:
            return f"{' '.join(path)} has no command {args[0]}"
        cmd, path = sub, [*path, name]
    names = _option_names(cmd)
    for a in args:
        if (a.startswith("--") and len(a) > 2 or re.fullmatch(r"-[A-Za-z]", a)) and a.split("=")[0] not in names:
            return f"{' '.join(path)} has no option {a}"
    return None


def test_the_cli_check_rejects_what_the_cli_rejects():
    assert cli_error(["mlc", "quantize", "m", "--scheme", "int8", "--out", "q"]) is None
    assert cli_error(["mlc", "--runs-dir", "r", "merge", "x.yml", "--out", "o"]) is None  # `mlc merge CONFIG.yml`
    assert "no option --bits-per-weight" in cli_error(["mlc", "quantize", "m", "--bits-per-weight", "4"])
    assert "no option -Z" in cli_error(["mlc", "upcycle", "m", "-Z", "4"])
    assert cli_error(["mlc", "runs", "graph"]) is not None
    assert cli_error(["mlc", "transmogrify"]) is not None


@pytest.mark.parametrize("doc", sorted(p.name for p in DOCS.glob("*.md")))
def test_every_mlc_line_names_a_real_command_and_real_options(doc):
    for line, argv in mlc_lines(DOCS / doc):
        error = cli_error(argv)
        assert error is None, f"docs/{doc}:{line}: {error}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_smollm2(out: Path) -> Path:
    """A random Llama of mlc's bundled tiny shape, with its tokenizer and chat template, saved as an HF directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mlc import data

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(data.tiny_model_dir())).save_pretrained(out)
    for f in data.tiny_model_dir().iterdir():
        if f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What the docs call SmolLM2, made small: the HF directory and the GGUF file the walkthrough starts from."""
    from mlc import options
    from mlc.cli import main

    root = tmp_path_factory.mktemp("stand-ins")
    hf = _tiny_smollm2(root / "smollm2")
    saved = options.get()
    try:
        main(["--runs-dir", str(root / "runs"), "checkpoint", "convert", str(hf), "--to", "gguf", "--out", str(root / "gguf")])
    except SystemExit as e:
        assert e.code in (0, None), e
    finally:
        options.set_options(saved)
    return {"smollm2": hf, "SmolLM2-135M-Instruct.Q4_1.gguf": root / "gguf" / "model.gguf"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [*GUIDES, WALKTHROUGH])
def test_runnable_blocks_run(name, stand_ins, tmp_path):
    """Each runnable block runs in bash, as a reader would paste it, with this checkout's `mlc` first on PATH."""
    work = tmp_path / "work"
    work.mkdir()
    if name == WALKTHROUGH:  # it makes smollm2/ itself, from the GGUF
        shutil.copy(stand_ins["SmolLM2-135M-Instruct.Q4_1.gguf"], work / "SmolLM2-135M-Instruct.Q4_1.gguf")
    else:
        shutil.copytree(stand_ins["smollm2"], work / "smollm2")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "MLC_CACHE": str(tmp_path / "cache"),
           "NO_COLOR": "1"}
    env.pop("MLC_RUNS_DIR", None)  # the default, ./runs, as the docs say
    ran = 0
    for line, info, body in blocks(DOCS / f"{name}.md"):
        target = next((w.removeprefix("file=") for w in info if w.startswith("file=")), None)
        if target:
            (work / target).parent.mkdir(parents=True, exist_ok=True)
            (work / target).write_text(body)
        if info[:2] == ["bash", "runnable"]:
            # A server a block starts in the background is stopped even when the block fails; the docs' fixed port
            # becomes a free one, since other test sessions share this machine.
            script = "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + body.replace(str(SERVE_PORT), str(free_port()))
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"docs/{name}.md:{line}: the block exited {proc.returncode}\n{proc.stderr[-3000:]}"
            ran += len(commands(body))
    assert ran > 0
