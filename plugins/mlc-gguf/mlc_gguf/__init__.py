"""GGUF checkpoint format for mlc: read llama.cpp GGUF files into complete Hugging Face model directories.

Registered in the `mlc.formats.v1` entry-point group as `gguf`, so
`mlc checkpoint convert model.gguf --to hf --out DIR` works once this package is installed.
"""
