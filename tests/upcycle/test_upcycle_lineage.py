"""The artifact records its sources (hashes, producing runs) and options, so lineage shows where it came from."""

from __future__ import annotations

import json
import shutil

from mlc.runs import open_run
from mlc.runs.hashing import content_hash
from mlc.runs.lineage import lineage

from .upcycle_helpers import upcycle


def test_lineage_names_the_base_run_the_sources_and_the_options(tiny_llama, finetunes, prompts_file, tmp_path, runs_root):
    with open_run("merge", runs_root=runs_root) as producer:  # a stand-in for `mlc merge`, the base's maker
        with producer.artifact("model") as staging:
            shutil.copytree(tiny_llama, staging, dirs_exist_ok=True)
    out = upcycle(
        "latest:merge", tmp_path / "moe", experts=4, top_k=2, drop_ratio=0.25, seed=11,
        expert_sources=[str(f) for f in finetunes], router="cheap_embed", expert_prompts=str(prompts_file),
    )
    tree = lineage(runs_root, str(out))
    assert tree["command"] == "upcycle" and tree["artifact"] == "model"
    roles = {(i["role"], i.get("run") or i.get("path")) for i in tree["inputs"]}
    assert ("base", producer.id) in roles  # the base resolves to the merge run that made it
    assert {r for r, _ in roles} == {"base", "expert-source", "expert-prompts"}
    sources = [i for i in tree["inputs"] if i["role"] == "expert-source"]
    assert [s["hash"] for s in sources] == [content_hash(f) for f in finetunes]

    provenance = json.loads((out / "mlc-provenance.json").read_text())
    options = provenance["meta"]["upcycle"]
    assert (options["experts"], options["top_k"], options["drop_ratio"], options["seed"], options["router"]) == (4, 2, 0.25, 11, "cheap_embed")
    assert provenance["meta"]["experts_from"] == [str(finetunes[0]), str(finetunes[1])] * 2
    assert provenance["meta"]["layout"] == "MixtralForCausalLM"
