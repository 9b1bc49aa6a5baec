"""Tensor storage: streaming safetensors, Hugging Face model directories, checkpoint formats, the
on-disk layouts of quantised weights (quant_format), PEFT LoRA adapter directories (peft), atomic outputs.

Import the submodules directly (mlc.io.safetensors_reader, ...): this package file stays empty so
that torch-free callers such as the run index can use mlc.io.atomic without importing torch.
"""
