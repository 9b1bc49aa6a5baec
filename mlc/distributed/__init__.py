"""The distributed engine: launch, process groups, parallelism, checkpoint manager. Import submodules directly."""
