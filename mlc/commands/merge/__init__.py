"""mlc merge: every standard merge method, mergekit YAML, streaming at disk speed, optimised merges.

Python API (none of it needs the CLI):
    from mlc.commands.merge.api import run_merge, merge_tensors
    run_merge("config.yml", "out/")                      # a whole merge, streamed to an HF directory
    merge_tensors("ties", [a, b], base=w0, params={"weight": 0.5, "density": 0.5})

Merge methods are plugins (entry-point group mlc.merge_methods.v1); see method.py for the protocol.
"""
