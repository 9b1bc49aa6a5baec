"""`mlc bench sweep` over scripted servers whose speed the grid sets: the SLO pick, the front, the reproducing command."""

from __future__ import annotations

import json
import shlex
import sys

import pytest

from mlc.commands.bench import sweep as sw
from tests.bench.conftest import write_prompts

SERVER = f"{sys.executable} -m tests.bench.scripted_server {{port}} --ttft 20 --itl {{itl}}"


@pytest.fixture
def in_repo(monkeypatch):
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)  # the scripted server runs as `python -m tests.bench...`


@pytest.mark.slow
def test_the_sweep_picks_the_best_point_within_the_slos_and_its_command_reproduces_it(run_mlc, tmp_path, in_repo):
    data = write_prompts(tmp_path / "p.jsonl", ["hello", "world"])
    code, out, err = run_mlc("bench", "sweep", "--server-template", SERVER, "--grid", "itl=5,40", "--load", "concurrency=1,4",
                             "--slo", "tpot:25", "--slo", "ttft:150", "--dataset", "jsonl", "--dataset-path", data, "--output-len", "3",
                             "--plot", tmp_path / "plots", "--json")
    assert code == 0, err
    result = json.loads(out)
    points = {p["label"]: p for p in result["points"]}
    assert set(points) == {"itl=5 concurrency=1", "itl=5 concurrency=4", "itl=40 concurrency=1", "itl=40 concurrency=4"}
    # TPOT is the scripted gap: 5 ms meets tpot<=25, 40 ms misses it (goodput 0); four streams give about four times the goodput of one.
    for label, p in points.items():
        r = p["result"]
        assert r["median_tpot_ms"] == pytest.approx(5 if "itl=5" in label else 40, abs=4)
        assert (r["p99_tpot_ms"] <= 25) == ("itl=5" in label)
        assert (r["request_goodput"] > 0) == ("itl=5" in label)
        assert p["tokens_per_user"] == pytest.approx(r["output_throughput"] / int(p["load_params"]["concurrency"]))
        assert r["num_prompts"] == max(16, 4 * int(p["load_params"]["concurrency"]))
        argv = shlex.split(p["command"])  # each server's second load point gets new prompts (seed + 1): no cached prefixes
        assert int(argv[argv.index("--seed") + 1]) == (0 if p["load_params"]["concurrency"] == "1" else 1)
    assert result["chosen"]["label"] == "itl=5 concurrency=4"
    assert "itl=5 concurrency=4" in result["pareto"] and "itl=40 concurrency=1" not in result["pareto"]
    assert (tmp_path / "plots" / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    argv = shlex.split(result["chosen"]["command"])
    assert argv[:3] == ["mlc", "bench", "serve"] and "--max-concurrency" in argv and "4" in argv
    code, out, err = run_mlc(*argv[1:], "--json")
    assert code == 0, err
    again = json.loads(out)
    assert again["p99_tpot_ms"] <= 25 and again["request_goodput"] == pytest.approx(again["request_throughput"])


def test_a_server_setting_that_fails_to_start_fails_only_its_points(run_mlc, tmp_path, in_repo):
    data = write_prompts(tmp_path / "p.jsonl", ["hello"])
    template = f"{sys.executable} -m tests.bench.scripted_server {{port}} --itl {{itl}}"
    code, out, err = run_mlc("bench", "sweep", "--server-template", template, "--grid", "itl=1,oops", "--load", "concurrency=2",
                             "--dataset", "jsonl", "--dataset-path", data, "--output-len", "2", "--json")
    assert code == 0, err
    points = {p["label"]: p for p in json.loads(out)["points"]}
    assert points["itl=1 concurrency=2"]["result"]["completed"] == 16
    assert points["itl=oops concurrency=2"]["result"] is None and "exited with code 2" in points["itl=oops concurrency=2"]["error"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--server-template", "srv {port} --x {a}"], "no --grid or --var gives it"),
        (["--server-template", "srv {port}", "--grid", "a=1,2"], "not in the server template"),
        (["--server-template", "srv --x {a}", "--grid", "a=1,2"], "no {port}"),
        (["--server-template", "srv {port} {a?--fast}", "--grid", "a=1,maybe"], "yes/no value"),
        (["--server-template", "srv {port}", "--load", "users=1,2"], "unknown --load users"),
        (["--server-template", "srv {port}", "--load", "concurrency=0"], "not a positive number"),
        (["--server-template", "srv {port} {a}", "--grid", "a"], "bad --grid"),
        (["--server-template", "srv {port} {a}", "--grid", "a=1", "--var", "a=2"], "both a --grid and a --var"),
        (["--server-template", "srv {port}", "--slo", "ttft<5"], "bad SLO"),
    ],
)
def test_bad_sweep_options_fail_in_one_line_before_any_server_starts(run_mlc, args, words):
    code, out, err = run_mlc("bench", "sweep", *args)
    assert code == 2 and words in err and err.count("error:") == 1


def test_fill_inserts_values_and_yes_no_flags():
    t = "mlc serve {model} --port {port} --max-running {n} {compile?--compile}"
    assert sw.fill(t, {"model": "m", "port": "9", "n": "8", "compile": "1"}) == "mlc serve m --port 9 --max-running 8 --compile"
    assert sw.fill(t, {"model": "m", "port": "9", "n": "8", "compile": "false"}) == "mlc serve m --port 9 --max-running 8"


def test_the_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    def point(label, users, tok_s):
        return {"label": label, "result": {"output_throughput": tok_s, "max_concurrency": users}}

    pts = [point("a", 1, 50), point("b", 4, 160), point("c", 4, 120), point("d", 16, 400), point("e", 16, 390)]
    # tokens/s per user: a 50, b 40, c 30, d 25, e 24.4: c is beaten by b on both, e by d
    assert [p["label"] for p in sw.pareto(pts)] == ["d", "b", "a"]


def test_the_table_keeps_each_label_whole_in_a_pipe(capsys):
    from mlc.commands.bench import cli

    result = {"request_throughput": 1.0, "output_throughput": 10.0, "p99_ttft_ms": 5.0, "p99_tpot_ms": 1.0, "request_goodput": 1.0}
    point = {"label": "max_running=16 concurrency=32", "result": result, "load_params": {"concurrency": "32"}, "error": None}
    cli._print_wide(sw.table([point], {"ttft": 10.0}, 99.0, point))
    assert "max_running=16 concurrency=32" in capsys.readouterr().out  # at rich's 80 columns: "max_ru…"
