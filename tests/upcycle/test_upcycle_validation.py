"""Validation before work: every problem is listed at once, the exit code is 1, and nothing is written."""

from __future__ import annotations

import pytest

from mlc.commands.upcycle.options import UpcycleOptions
from mlc.commands.upcycle.validate import validate
from mlc.errors import ValidationError

from .upcycle_helpers import make_dense, upcycle


def problems_of(runs_root, **kw) -> list[str]:
    with pytest.raises(ValidationError) as info:
        validate(UpcycleOptions(**{"out": None, "experts": 4, "top_k": 2, **kw}), runs_root)
    return info.value.problems


def test_every_problem_is_listed_and_nothing_is_left_behind(tiny_llama, tmp_path, run_mlc):
    out = tmp_path / "moe"
    code, stdout, stderr = run_mlc(
        "upcycle", tiny_llama, "--out", out, "--experts", "2", "--top-k", "3", "--drop-ratio", "1.5",
        "--router", "hidden", "--expert-source", tmp_path / "missing", "--routing", "softmax-topk",
    )
    assert code == 1
    lines = [line for line in stderr.splitlines() if line.strip().startswith("- ")]
    assert len(lines) == 5, stderr
    for needle in ("experts >= top-k", "--drop-ratio 1.5", "needs --expert-prompts", "missing does not exist", "needs --shared-expert"):
        assert any(needle in line for line in lines), (needle, stderr)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".moe")]  # no staging directory either
    assert not run_mlc.runs_dir.exists()  # validation runs before the run directory is made


def test_sources_must_share_the_base_architecture_and_shapes(tiny_llama, tiny_qwen2, tmp_path, runs_root):
    wider = make_dense(tmp_path / "wider", intermediate=80)
    found = problems_of(runs_root, base=str(tiny_llama), expert_sources=[str(tiny_qwen2), str(wider)])
    assert found == [
        f"--expert-source {tiny_qwen2} is Qwen2ForCausalLM, the base is LlamaForCausalLM",
        f"--expert-source {wider}: 6 tensors differ in shape from the base (first: model.layers.0.mlp.down_proj.weight [32, 80] vs [32, 64])",
    ]


def test_more_sources_than_experts_is_refused(tiny_llama, finetunes, runs_root):
    found = problems_of(runs_root, base=str(tiny_llama), experts=1, top_k=1, expert_sources=[str(f) for f in finetunes])
    assert found == ["2 --expert-source models but only 1 experts: each expert copies one source"]


def test_prompts_must_exist_for_each_expert(tiny_llama, tmp_path, runs_root):
    prompts = tmp_path / "p.yaml"
    prompts.write_text("experts:\n  - positive: [a b]\n  - negative: [c]\n  - positive: []\n")
    found = problems_of(runs_root, base=str(tiny_llama), router="cheap_embed", expert_prompts=str(prompts))
    assert "has prompts for 3 experts, but --experts is 4" in found[0]
    assert sum("has no positive prompts" in p for p in found) == 2


def test_prompts_without_a_prompt_router_are_not_silently_ignored(tiny_llama, prompts_file, runs_root):
    found = problems_of(runs_root, base=str(tiny_llama), expert_prompts=str(prompts_file))
    assert found == ["--expert-prompts is used by --router hidden or cheap_embed, not by --router random"]


def test_layouts_that_cannot_hold_the_base_are_refused(tiny_qwen2, tmp_path, runs_root):
    found = problems_of(runs_root, base=str(tiny_qwen2))
    assert found == [f"BASE {tiny_qwen2} has q/k/v biases, which Mixtral cannot hold: use --shared-expert (Qwen2-MoE has them)"]
    moe = upcycle(tiny_qwen2, tmp_path / "moe", shared_expert=True)
    found = problems_of(runs_root, base=str(moe))
    assert "not a dense model" in found[0]


def test_merge_problems_are_reported_before_work(tiny_llama, finetunes, runs_root):
    found = problems_of(runs_root, base=str(tiny_llama), shared_merge="no_such_method")
    assert found == ["--shared-merge merges the --expert-source models, but none was given"]
    found = problems_of(runs_root, base=str(tiny_llama), expert_sources=[str(finetunes[0])], shared_merge="no_such_method")
    assert found[0].startswith("--shared-merge: unknown merge method 'no_such_method'")
    found = problems_of(runs_root, base=str(tiny_llama), expert_sources=[str(finetunes[0])], shared_merge="ties", merge_params=["densty=0.5"])
    assert "unknown parameter 'densty' for ties (did you mean 'density'?)" in found[0]
    found = problems_of(runs_root, base=str(tiny_llama), merge_params=["density=0.5"])
    assert found == ["--merge-param sets parameters of --shared-merge, which was not given"]


def test_an_existing_output_needs_overwrite(tiny_llama, tmp_path, runs_root):
    (tmp_path / "taken").mkdir()
    found = problems_of(runs_root, base=str(tiny_llama), out=str(tmp_path / "taken"))
    assert found == [f"--out {tmp_path / 'taken'} already exists (pass --overwrite to replace it)"]


def test_a_failure_during_writing_leaves_no_output(tiny_llama, tmp_path, runs_root, monkeypatch):
    from mlc.io.safetensors_writer import ShardedWriter

    calls = []

    def failing_write(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk full")

    monkeypatch.setattr(ShardedWriter, "write", failing_write)
    with pytest.raises(OSError):
        upcycle(tiny_llama, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "runs"] == []
    from mlc.runs import index

    [run] = index.query_runs(runs_root, command="upcycle")
    assert run["status"] == "failed"
