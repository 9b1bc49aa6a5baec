"""Kernels: quantised linear layers, attention over a paged KV cache, sampling. Import submodules directly."""
