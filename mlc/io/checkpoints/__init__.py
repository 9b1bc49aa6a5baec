"""The built-in checkpoint formats (hf, dcp, torch, universal, tp), each registered in `mlc.formats.v1`."""
