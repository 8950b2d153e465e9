"""evaluate/: the downstream protocols (DESIGN.md §6): `python -m evaluate {finetune,linear,retrieval,knn,cam,temporal,export}`.

Reads a checkpoint of `python -m train` (the query encoder `encoder_q.*`) or a seeded random init, and labelled
shard sets OUT/train and OUT/test from `python -m preprocess`; writes results.json, TensorBoard scalars and a
printed table per command. Imports pipeline/, model/ and the run machinery of train/; nothing imports it.

* cli.py          the command line (flags, defaults, errors)
* protocols.py    presets: the FAME/FIMA recipe (default) and the CoCLR recipe; every value a flag
* backbone.py     checkpoint -> backbone (architecture checks, weights hash), random init
* data.py         shard sets, label / class checks, test and train sampling configs
* features.py     the test-protocol loop over all ranks, the frozen-backbone guard, the feature cache
* metrics.py      pure functions: per-video averaging, top-k accuracy, video features, Recall@k, kNN votes
* finetune.py, linear.py, retrieval.py, knn.py, cam.py, temporal.py, export.py   one module per command
* report.py       results JSON, TensorBoard scalars, the table
"""
from .metrics import average_per_video, cosine_similarity_matrix, recall_at_k, topk_accuracy, video_features

__all__ = ["average_per_video", "cosine_similarity_matrix", "recall_at_k", "topk_accuracy", "video_features"]
