"""preprocess: the one-time sharding command, `python -m preprocess SRC OUT` (see `--help`)."""
