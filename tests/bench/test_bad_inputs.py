"""Bad inputs to `mlc bench`: one line that says what is wrong, a non-zero exit, and no result left behind."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import free_port, write_prompts


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["--base-url", "ftp://example.com"], 2, "not an http(s) URL"),
        (["--base-url", "localhost:8000"], 2, "not an http(s) URL"),
        (["--base-url", "http://127.0.0.1:99999"], 2, "bad port"),
        (["--goodput", "ttft=500"], 2, "bad SLO"),
        (["--goodput", "itl:50"], 2, "bad SLO"),
        (["--goodput", "ttft:fast"], 2, "bad SLO"),
        (["--percentiles", "99,101"], 2, "bad --percentiles"),
        (["--endpoint", "embeddings"], 2, "not completions or chat"),
        (["--burstiness", "0"], 2, "must be positive"),
        (["--ramp-up", "linear"], 2, "--ramp-up needs"),
        (["--ramp-up", "sudden", "--ramp-up-start-rps", "1", "--ramp-up-end-rps", "2"], 2, "not linear or exponential"),
        (["--extra-body", "{oops"], 2, "not JSON"),
        (["--dataset", "sharegpt"], 2, "needs --dataset-path"),
        (["--dataset", "movies"], 2, "unknown dataset"),
        (["--dataset", "random"], 2, "needs the model's tokenizer"),
        (["--server", "mlc serve x"], 2, "needs {port}"),
    ],
)
def test_bad_options_fail_in_one_line_before_any_request(run_mlc, args, code, words):
    got, out, err = run_mlc("bench", "serve", *args)
    assert got == code and words in one_error(err) and out == ""


def test_an_unreachable_server_is_named_with_a_hint(run_mlc, tmp_path):
    data = write_prompts(tmp_path / "p.jsonl", ["hello"])
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, out, err = run_mlc("bench", "serve", "--base-url", url, "--dataset", "jsonl", "--dataset-path", data, "-n", "1")
    line = one_error(err)
    assert code == 1 and f"cannot reach {url}" in line and "--base-url" in line


def test_a_server_command_that_dies_is_reported_with_its_last_line(run_mlc, tmp_path):
    data = write_prompts(tmp_path / "p.jsonl", ["hello"])
    code, out, err = run_mlc("bench", "serve", "--server", "python -c 'import sys; print(\"boom {port}\"); sys.exit(3)'",
                             "--dataset", "jsonl", "--dataset-path", data, "-n", "1")
    line = one_error(err)
    assert code == 1 and "exited with code 3" in line and "boom" in line


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("missing.jsonl", None, "does not exist"),
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', "line 2 is not JSON"),
        ("noprompt.jsonl", '{"text": "a"}\n', "neither a 'prompt'"),
        ("empty.jsonl", "\n\n", "holds no prompts"),
        ("bad.json", "[{", "not valid JSON"),
        ("dict.json", '{"conversations": []}', "not a list"),
        ("noconv.json", '[{"id": 1}]', "no 'conversations'"),
        ("short.json", '[{"conversations": [{"value": "hi"}]}]', "no conversation with two turns"),
    ],
)
def test_bad_dataset_files_fail_in_one_line(run_mlc, tmp_path, name, content, words):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    dataset = "sharegpt" if name.endswith(".json") else "jsonl"
    code, out, err = run_mlc("bench", "serve", "--dataset", dataset, "--dataset-path", path, "-n", "1")
    assert code == 1 and words in one_error(err)


def test_a_failed_bench_run_is_recorded_failed_with_no_result_artifact(run_mlc, tmp_path):
    code, _, _ = run_mlc("bench", "serve", "--base-url", f"http://127.0.0.1:{free_port()}", "--dataset", "chat", "--output-len", "4", "-n", "1")
    assert code == 1
    (run,) = [p for p in run_mlc.runs_dir.iterdir() if p.is_dir() and "bench" in p.name]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and record["artifacts"] == {}
