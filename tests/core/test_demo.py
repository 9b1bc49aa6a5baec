"""`mlc demo`, the README's main job: every lifecycle stage runs, each leaves a run, and the lineage links them."""

import json

from .conftest import run_mlc

STAGES = ["base", "base-hf", "base-lawa", "chat", "merge", "eval-base", "eval-chat", "eval-merge", "quantize", "upcycle", "moe-train", "serve", "bench"]


def test_demo_runs_the_whole_lifecycle_and_every_artifact_traces_back(demo_runs):
    runs, proc = demo_runs  # one `mlc --runs-dir RUNS demo --json` per session (tests/conftest.py), also read by tests/runs_ui
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert [s["name"] for s in summary["stages"]] == STAGES
    by_name = {s["name"]: s for s in summary["stages"]}
    for stage in summary["stages"]:
        run = json.loads((runs / stage["run_id"] / "run.json").read_text())
        assert run["status"] == "completed", stage["name"]
    assert by_name["chat"]["figures"]["world_size"] == 2  # the distributed path ran under torchrun
    assert by_name["base"]["figures"]["final_loss"] < 6.5  # from ln(vocab) ~ 8.3: it learned
    assert by_name["quantize"]["figures"]["perplexity_after"] < 1.01 * by_name["quantize"]["figures"]["perplexity_before"]
    assert by_name["serve"]["figures"]["generation_tokens"] > 0 and by_name["serve"]["figures"]["answer"]
    # The LAWA average of base's last checkpoints reports its perplexity, and its lineage reaches the train run.
    assert by_name["base-lawa"]["figures"]["perplexity"] > 1
    lawa = run_mlc("--runs-dir", str(runs), "runs", "lineage", f"run:{by_name['base-lawa']['run_id']}", "--json")
    assert lawa.returncode == 0 and by_name["base"]["run_id"] in lawa.stdout
    bench = by_name["bench"]["figures"]  # `mlc bench serve` against the served model, linked to it by lineage
    assert bench["ttft_ms"] > 0 and bench["tpot_ms"] > 0 and bench["output_tok_s"] > 0
    bench_lineage = run_mlc("--runs-dir", str(runs), "runs", "lineage", f"run:{by_name['bench']['run_id']}", "--json")
    assert by_name["quantize"]["run_id"] in bench_lineage.stdout
    # The quantised model's lineage reaches both trained runs through the merge.
    lineage = run_mlc("--runs-dir", str(runs), "runs", "lineage", f"run:{by_name['quantize']['run_id']}", "--json")
    assert lineage.returncode == 0, lineage.stderr
    text = lineage.stdout
    assert by_name["merge"]["run_id"] in text and by_name["base"]["run_id"] in text and by_name["chat"]["run_id"] in text
