"""mlc upcycle: dense checkpoints into Mixture-of-Experts models (Mixtral, Qwen2-MoE).

Import the submodules directly; this file stays empty so `mlc upcycle --help` imports only cli.py.
"""
