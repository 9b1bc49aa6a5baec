"""The CLI surface: fast help without torch, version, completion, one-line errors and exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlc import plugins

from .conftest import imported_modules, run_mlc


def builtin_commands() -> list[str]:
    plugins.reset_cache()
    return sorted(plugins.available("commands"))


def test_root_help_imports_neither_torch_nor_any_command_module():
    modules, proc = imported_modules(["--help"])
    assert proc.returncode == 0, proc.stderr
    assert "torch" not in modules
    assert not [m for m in modules if m.startswith("mlc.commands.")]
    for name in builtin_commands():
        assert name in proc.stdout


def test_each_command_help_imports_no_torch_and_no_other_command():
    for name in builtin_commands():
        modules, proc = imported_modules([name, "--help"])
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
        assert "torch" not in modules, f"`mlc {name} --help` imported torch"
        foreign = [m for m in modules if m.startswith("mlc.commands.") and not m.startswith(f"mlc.commands.{name}")]
        assert not foreign, f"`mlc {name} --help` imported {foreign}"
        own = [m for m in modules if m.startswith(f"mlc.commands.{name}.")]
        assert own == [f"mlc.commands.{name}.cli"], f"`mlc {name} --help` imported more than its cli module: {own}"


def test_version_prints_package_version():
    proc = run_mlc("--version")
    assert proc.returncode == 0
    from mlc import __version__

    assert proc.stdout.strip() == f"mlc {__version__}"


def test_shell_completion_completes_commands_and_subcommands():
    env = {**os.environ, "_MLC_COMPLETE": "complete_bash", "COMP_WORDS": "mlc ru", "COMP_CWORD": "1"}
    proc = subprocess.run([sys.executable, "-m", "mlc"], capture_output=True, text=True, env=env)
    assert "runs" in proc.stdout
    env.update(COMP_WORDS="mlc runs li", COMP_CWORD="2")
    proc = subprocess.run([sys.executable, "-m", "mlc"], capture_output=True, text=True, env=env)
    assert "lineage" in proc.stdout


def test_unknown_command_is_a_usage_error_with_exit_code_2():
    proc = run_mlc("no-such-command")
    assert proc.returncode == 2
    assert "no-such-command" in proc.stderr


def test_mlc_error_prints_one_line_without_traceback_and_exits_1(tmp_path: Path):
    proc = run_mlc("--runs-dir", str(tmp_path), "runs", "show", "run:doesnotexist")
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no run 'doesnotexist'")
    assert "Traceback" not in proc.stderr


def test_debug_flag_shows_the_traceback(tmp_path: Path):
    proc = run_mlc("--debug", "--runs-dir", str(tmp_path), "runs", "show", "run:doesnotexist")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr


def test_ctrl_c_exits_130_and_marks_the_run_interrupted(plugin_site: Path, tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(plugin_site), "MLC_RUNS_DIR": str(tmp_path / "runs")}
    marker = tmp_path / "started"
    # The child starts with Ctrl-C's default disposition, as under a terminal. It inherits an ignored SIGINT otherwise
    # (as a shell's background job does, and Python then rightly leaves it ignored): in the full suite some earlier
    # test in the same worker left SIGINT ignored, and the nap slept through the signal.
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlc", "nap", "--marker", str(marker)], env=env, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 30
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    from mlc.runs import read_run
    from mlc.runs.refs import find_run

    record = read_run(find_run(tmp_path / "runs", marker.read_text()))
    assert record.status == "interrupted"
    assert record.data["exit_code"] == 130
