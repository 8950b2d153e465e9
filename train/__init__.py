"""train/: the pretraining command `python -m train` / `torchrun -m train`, and the run machinery shared with
evaluate/ (config, distributed set-up, checkpoints, metrics)."""
