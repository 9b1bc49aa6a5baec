"""mlc train: pretraining and fine-tuning (see cli.py; the loop is loop.py)."""
