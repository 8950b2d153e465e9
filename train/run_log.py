"""The run log: TensorBoard scalars, a console line, a progress bar with ETA, and a JSON-lines log (rank 0 only)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):   # a torn last line
        return float("inf")


class RunLog:
    def __init__(self, out_dir: Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(Path(out_dir) / "tb"))
        path = Path(out_dir) / "metrics.jsonl"
        if path.is_file():   # a run killed after its last checkpoint logged steps that the resumed run repeats
            kept = [ln for ln in path.read_text().splitlines(keepends=True) if _step_of(ln) <= start_step]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(kept))
            tmp.replace(path)
        self.log_file = open(path, "a")
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not progress)

    def step(self, n: int = 1, postfix: dict | None = None) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(n)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.log_file.write(json.dumps({"step": step, "time": round(time.time(), 3), **scalars}) + "\n")
        self.log_file.flush()

    def print(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.log_file.close()
