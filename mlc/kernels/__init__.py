"""Kernels: quantised Linear layers and their weights' bit packing, attention over a paged KV cache,
the native C matrix-vector kernels, and token sampling. They import nothing from mlc above the base
modules (errors, paths): loaders live in mlc.models, on-disk layouts in mlc.io. Import submodules directly."""
