"""The built-in merge methods, each registered through the mlc.merge_methods.v1 entry point."""
