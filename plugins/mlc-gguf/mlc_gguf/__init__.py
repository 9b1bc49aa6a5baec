"""GGUF checkpoint format for mlc."""
