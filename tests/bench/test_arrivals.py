"""The arrival process: gamma gaps with the asked-for mean rate and a coefficient of variation of 1/sqrt(burstiness)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mlc.commands.bench.arrivals import arrival_times
from tests.bench.conftest import write_prompts


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 2.0])
def test_gaps_have_the_rate_and_the_gamma_coefficient_of_variation(burstiness):
    n, rate = 20000, 8.0
    times = arrival_times(n, rate, burstiness, seed=3)
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert n / times[-1] == pytest.approx(rate, rel=1e-12)  # rescaled so the last request leaves at N / rate, as vLLM
    cv = gaps.std() / gaps.mean()
    # A Gamma(k) variable's CV is 1/sqrt(k); the estimate's standard error with 20000 gaps is about 1% of it.
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    assert (np.diff(times) >= 0).all()


def test_the_seed_repeats_the_times_and_another_seed_changes_them():
    a, b, c = arrival_times(50, 5.0, 1.0, seed=1), arrival_times(50, 5.0, 1.0, seed=1), arrival_times(50, 5.0, 1.0, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_infinite_rate_sends_everything_at_once_and_infinite_burstiness_evenly():
    assert (arrival_times(10, float("inf")) == 0).all()
    assert np.allclose(np.diff(arrival_times(10, 4.0, float("inf"))), 0.25)


@pytest.mark.parametrize("strategy", ["linear", "exponential"])
def test_ramp_up_moves_the_rate_from_start_to_end(strategy):
    times = arrival_times(11, float("inf"), float("inf"), ramp_up=strategy, ramp_start=1.0, ramp_end=16.0)
    gaps = np.diff(np.concatenate([[0.0], times]))
    expected = [1 + 15 * i / 10 for i in range(11)] if strategy == "linear" else [16 ** (i / 10) for i in range(11)]
    assert np.allclose(1 / gaps, expected)


def test_requests_leave_the_client_on_schedule(scripted, run_mlc, tmp_path):
    """End to end against an instant server: each request is sent at its scheduled time, give or take the event loop."""
    n, rate = 300, 150.0
    data = write_prompts(tmp_path / "p.jsonl", ["script n=2"])
    out = tmp_path / "r.json"
    code, _, err = run_mlc("bench", "serve", "--base-url", scripted.url, "--dataset", "jsonl", "--dataset-path", data,
                           "-n", n, "--request-rate", rate, "--seed", "5", "--save-result", out, "--save-detailed")
    assert code == 0, err
    result = json.loads(out.read_text())
    sent = np.array([r["start"] for r in sorted(result["per_request"], key=lambda r: r["index"])])
    lag = sent - arrival_times(n, rate, 1.0, seed=5)
    # Never early; late by the event loop's wake-up (about 1 ms on a quiet 2-core machine, 7 ms measured at load
    # average 13, so the bound is 20 ms), and not drifting: times are absolute, so a late request does not push back
    # the ones after it.
    assert (lag >= 0).all() and np.median(lag) < 2e-2
    assert np.median(lag[-n // 4 :]) < np.median(lag[: n // 4]) + 5e-3
    assert len(scripted.entries()) == n + 1 and result["completed"] == n  # and the server got every one (+ the check)
