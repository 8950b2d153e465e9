"""The run's record of bad samples: the file, the sharing across ranks, and the limit, in one place.

The loader sets a sample aside when it cannot be read or decoded and feeds a deterministic stand-in
(pipeline/loader.py). This module makes that a run-level fact:

* every rank's finds are gathered once per step (only when some rank found one: the check rides on the
  step's existing flag collective), every rank adds all of them to its loader, and rank 0 appends them to
  ``OUT_DIR/bad_samples.jsonl`` (one JSON record per line: key, index, shard, offset, error, epoch, step, rank);
* a run (or a resumed run) starts with the samples of that file and of ``exclude_samples`` set aside, so it
  never meets them again and feeds what the uninterrupted run fed;
* ``max_bad_samples`` (a count, or a fraction of the shard set when < 1) is compared with a number that is the
  same on every rank, so all ranks stop together, with a checkpoint. A fraction rounds up and allows at least one
  (``limit``): the threshold is there to catch systematic damage (a wrong codec, a failing disk), and one damaged
  file in a 48-video set is not that; 0 allows none.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from . import distributed as D

FILE = "bad_samples.jsonl"


def read_records(path: Path) -> list[dict]:
    """Records of a bad_samples.jsonl (a torn last line, from a killed writer, is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_keys(path: Path) -> list[dict]:
    """A key list (one per line, '#' comments allowed), as records the loader takes."""
    if not path.is_file():
        raise FileNotFoundError(f"exclude_samples={path}: no such file (give a key list such as the bad_keys.txt "
                                "written by `python -m preprocess verify OUT`)")
    return [{"key": ln.strip(), "error": f"listed in {path}"} for ln in path.read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def limit(max_bad: float, num_videos: int) -> int:
    """How many bad samples a run tolerates: ``max_bad`` itself when >= 1 (a count), else that fraction of the set
    rounded up and at least one, so the default 0.01 tolerates one bad file in any set (0 tolerates none)."""
    if max_bad >= 1:
        return int(max_bad)
    if max_bad <= 0:
        return 0
    return max(1, math.ceil(max_bad * num_videos))


class BadSamples:
    def __init__(self, out_dir: Path, loader, max_bad: float, exclude_file: str, d: D.Dist):
        self.path, self.loader, self.d = Path(out_dir) / FILE, loader, d
        self.limit = limit(max_bad, loader.num_videos)
        if d.is_main and self.path.is_file():   # a writer killed mid-line: drop the fragment, or the next append
            data = self.path.read_bytes()          # would be glued to it and lost with it
            if data and not data.endswith(b"\n"):
                self.path.write_bytes(data[:data.rfind(b"\n") + 1])
        known = read_records(self.path) + (read_keys(Path(exclude_file)) if exclude_file else [])
        self.excluded = loader.exclude(known)

    @property
    def count(self) -> int:
        return len(self.loader.bad)

    def share(self, found: list[dict], any_rank_found: bool) -> list[dict]:
        """After the step's flag collective said some rank found bad samples: gather every rank's ``found`` (this
        rank's from ``loader.take_new_bad()``), set them all aside here, log them (rank 0). Returns them."""
        if not any_rank_found:
            return []
        records = [r for rank in D.gather_objects(found, self.d) for r in rank]
        self.loader.exclude(records)
        if self.d.is_main and records:
            with open(self.path, "a") as f:      # appends of whole lines; a torn line is skipped when read back
                f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
                f.flush()
                os.fsync(f.fileno())
        return records

    def over_limit(self) -> bool:
        return self.count > self.limit

    def stop_message(self, step: int, data: str) -> str:
        keys = [r.get("key", "?") for r in list(self.loader.bad.values())[:5]]
        more = f" and {self.count - len(keys)} more" if self.count > len(keys) else ""
        return (f"{self.count} samples of {data} could not be read or decoded (max_bad_samples allows {self.limit}): "
                f"{', '.join(keys)}{more}, all listed in {self.path}. A checkpoint was saved at step {step}. Check the "
                f"shards with `python -m preprocess verify {Path(data).parent}` (re-copy or re-shard what it names), "
                "or raise max_bad_samples and resume")
