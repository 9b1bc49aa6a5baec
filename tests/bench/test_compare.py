"""`mlc bench compare`: relative changes computed by hand, and --fail-on checks that fail CI on a regression."""

from __future__ import annotations

import json

import pytest

A = {"completed": 100, "failed": 0, "duration": 20.0, "request_throughput": 5.0, "output_throughput": 640.0,
     "mean_tpot_ms": 40.0, "p99_tpot_ms": 50.0, "mean_ttft_ms": 300.0, "p99_ttft_ms": 900.0, "request_rate": "inf"}
B = {**A, "failed": 2, "output_throughput": 576.0, "p99_tpot_ms": 53.0, "mean_ttft_ms": 240.0}


@pytest.fixture
def files(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(A))
    b.write_text(json.dumps(B))
    return a, b


def test_changes_are_b_minus_a_in_units_and_percent_of_a(run_mlc, files):
    code, out, err = run_mlc("bench", "compare", *files, "--json")
    assert code == 0, err
    rows = {r["metric"]: r for r in json.loads(out)["metrics"]}
    assert rows["output_throughput"]["change"] == -64.0 and rows["output_throughput"]["change_pct"] == pytest.approx(-10.0)
    assert rows["p99_tpot_ms"]["change_pct"] == pytest.approx(6.0)
    assert rows["mean_ttft_ms"]["change_pct"] == pytest.approx(-20.0) and rows["mean_ttft_ms"]["better"] is True
    assert rows["output_throughput"]["better"] is False and rows["failed"]["change"] == 2
    assert "request_rate" not in rows  # a setting, not a measurement


@pytest.mark.parametrize(
    "checks, code",
    [
        (["tpot_p99>+5%"], 1),          # +6% > +5%
        (["tpot_p99>+10%"], 0),
        (["p99_tpot_ms>+2.5"], 1),      # +3 ms > 2.5 ms
        (["output_throughput<-5%"], 1),  # -10%
        (["output_throughput<-15%"], 0),
        (["ttft_mean>+0%"], 0),          # TTFT improved
        (["failed>0"], 1),
        (["tpot_p99>+10%", "failed>0"], 1),
    ],
)
def test_fail_on_exits_1_only_when_a_limit_is_passed(run_mlc, files, checks, code):
    args = [x for c in checks for x in ("--fail-on", c)]
    got, out, err = run_mlc("bench", "compare", *files, *args)
    assert got == code, err
    if code:
        assert err.count("error:") == 1 and "regression" in err


@pytest.mark.parametrize("spec", ["tpot_p99>>5%", "tpot_p99 +5%", "tpot_p99>five", ">5%", "tpot_p99=5%"])
def test_bad_fail_on_syntax_is_a_usage_error(run_mlc, files, spec):
    code, out, err = run_mlc("bench", "compare", *files, "--fail-on", spec)
    assert code == 2 and "bad --fail-on" in err and err.count("error:") == 1


def test_a_check_on_a_metric_the_results_lack_names_it(run_mlc, files):
    code, out, err = run_mlc("bench", "compare", *files, "--fail-on", "itl_p99>+5%")
    assert code == 2 and "p99_itl_ms" in err


def test_files_that_are_not_results_fail_in_one_line(run_mlc, files, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    code, out, err = run_mlc("bench", "compare", files[0], bad)
    assert code == 1 and "not a bench result" in err
    code, out, err = run_mlc("bench", "compare", files[0], tmp_path / "missing.json")
    assert code == 1 and "does not exist" in err
