"""mlc merge: every standard merge method, mergekit YAML, streaming at disk speed, optimised merges.

Python API (none of it needs the CLI):

    from mlc.commands.merge.api import run_merge, plan_merge, merge_tensors
    run_merge("config.yml", "out/")            # validate, stream the merge to an HF directory, record a run
    plan = plan_merge(config_dict)             # validation only: every problem at once, no weight read
    merge_tensors("ties", [a, b], base=w0, params={"weight": 0.5, "density": 0.5})

    from mlc.commands.merge import lora, search
    lora.fold(base_dir, [adapter_dir], out_dir)            # or several adapters with a merge method
    lora.extract(base_dir, tuned_dir, out_dir, rank=16)    # a PEFT adapter by truncated SVD
    search.search(paths, objectives, workers=2)            # CMA-ES / NSGA-II over linear weights (ray="local" too)

Another command that only needs the math goes through the plugin, not this package:
`mlc.plugins.load_one("merge_methods", "ties")(models, base, params, rng=..., consume=True)`;
method.py documents that protocol.

Modules: method.py (plugin protocol), methods/ (built-in methods), sparsify.py (top-k by radix
select, DARE, breadcrumbs, DELLA), config.py (YAML and parameter resolution), plan.py (validation and
per-tensor jobs), tokenizer.py (vocabulary union, row re-indexing), executor.py (streaming),
api.py, lora.py, search.py, chat_templates.py, cli.py.
"""
