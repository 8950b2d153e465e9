"""The gradient-step loop, written once: pretraining (train/trainer.py) and fine-tuning (evaluate/finetune.py).

Each step, in this order: the step's learning rate (the schedule's value times a param group's ``mult``), one
``recipe.train_step`` (forward, the non-finite guard all ranks agree on, backward, the objective's after-backward
hook, the update), the progress bar, a stop after ``max_bad_steps`` non-finite steps in a row (with a checkpoint),
the log window (loss terms and metrics averaged over the window and the ranks, lr, epoch, videos/s, the
fraction of time spent waiting for data), the periodic evaluation, bad samples set aside (runs that keep a
BadSamples), pre-emption and the checkpoint cadence. The caller builds the parts (model, loader, optimiser,
checkpoints) and says what its periodic points do; the order lives here, so both runs resume, stop and log alike.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import distributed as D
from .checkpoint import CheckpointError, CheckpointManager, PreemptionFlag
from .recipe import train_step
from .run_log import RunLog


class TrainingError(RuntimeError):
    """A run that cannot continue (bad data, repeated non-finite losses, an incompatible checkpoint)."""


@dataclass
class Loop:
    model: torch.nn.Module                  # the objective to call (DDP-wrapped or not): batch -> {"loss", ...}
    loader: object                          # pipeline.VideoLoader: batches, and (epoch, step) for resume
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: object                             # the precision context (train/recipe.py precision_context)
    d: D.Dist
    log: RunLog
    lr_at: Callable[[int], float]           # step -> the schedule's learning rate
    log_every: int                          # every how many steps the loop logs, checkpoints and evaluates
    ckpt_every: int                         # (eval_every 0: never); the last step does all three
    ckpts: CheckpointManager                # where checkpoints go (rank 0 writes)
    snapshot: Callable[[int], dict]         # the checkpoint of this step (train/checkpoint.py snapshot: a collective)
    global_batch: int
    max_bad_steps: int = 5
    eval_every: int = 0
    evaluate: Callable[[int], None] | None = None       # at eval_every and the last step
    on_log: Callable[[int, dict], None] | None = None   # after each log window (e.g. fine-tuning's history)
    bad: object | None = None                           # train.bad_samples.BadSamples: set aside, not fatal
    data: str = ""                                      # named in the bad-sample stop message

    def run(self, step: int, stop_step: int) -> tuple[int, int]:
        """Steps from ``step`` to ``stop_step``; returns (the last step, exit code: 0, or 75 when pre-empted)."""
        objective = getattr(self.model, "module", self.model)
        use_cuda = self.d.device.type == "cuda"
        preempted = PreemptionFlag()
        bad_in_a_row, window = 0, {"n": 0, "wait": 0.0, "time": 0.0, "sums": {}}
        self.model.train()
        while step < stop_step:
            objective.set_epoch(self.loader.epoch)   # objectives with epoch-dependent terms (multi-level)
            t_ready = time.perf_counter()
            for batch in self.loader:
                t_batch = time.perf_counter()
                lr = self.lr_at(step)
                for g in self.opt.param_groups:
                    g["lr"] = lr * g.get("mult", 1.0)
                out, updated = train_step(self.model, batch, self.opt, self.scaler, self.amp, self.d)
                loss = out["loss"]
                if updated:
                    bad_in_a_row = 0
                else:   # the update was skipped on every rank (they agreed); keep going unless it persists
                    bad_in_a_row += 1
                    self.log.print(f"step {step}: non-finite loss or gradient (loss {float(loss):.3g}), update "
                                   f"skipped ({bad_in_a_row} in a row)")
                step += 1
                if use_cuda:
                    torch.cuda.synchronize(self.d.device)   # honest step times for the data-wait fraction
                t_done = time.perf_counter()
                window["n"] += 1
                window["wait"] += t_batch - t_ready
                window["time"] += t_done - t_ready
                for k, v in out.items():
                    if v.numel() == 1:
                        window["sums"][k] = window["sums"].get(k, 0.0) + float(v.detach())
                self.log.step(postfix={"loss": float(loss.detach()), "lr": lr})
                if bad_in_a_row >= self.max_bad_steps:
                    self.save(step)
                    raise TrainingError(f"{bad_in_a_row} non-finite losses or gradients in a row at step {step}: "
                                        "lower lr, use precision=fp32 to check, or inspect the data; a checkpoint "
                                        "was saved")
                if step % self.log_every == 0 or step == stop_step:
                    self._log_window(step, lr, window)
                    window = {"n": 0, "wait": 0.0, "time": 0.0, "sums": {}}
                if self.evaluate and ((self.eval_every and step % self.eval_every == 0)
                                      or step == stop_step):
                    self.evaluate(step)
                found = self.loader.take_new_bad() if self.bad is not None else []
                stop, any_found = D.max_over_ranks([int(bool(preempted)), len(found)], self.d)   # one collective
                if self.bad is not None:
                    for r in self.bad.share(found, bool(any_found)):
                        self.log.print(f"step {step}: bad sample set aside: {r['error']}")
                    if self.bad.over_limit():
                        self.save(step)
                        raise TrainingError(self.bad.stop_message(step, self.data))
                if stop or step % self.ckpt_every == 0 or step == stop_step:
                    self.save(step)
                if stop:
                    self.log.print(f"pre-empted (signal {preempted.signum or 'on another rank'}): checkpoint at step "
                                   f"{step} saved; exit status {PreemptionFlag.EXIT_PREEMPTED}; resume with the same "
                                   "command (--resume auto)")
                    return step, PreemptionFlag.EXIT_PREEMPTED
                if step >= stop_step:
                    break
                t_ready = time.perf_counter()
        return step, 0

    def save(self, step: int) -> None:
        """A checkpoint (every rank takes part, rank 0 writes): a write that fails stops every rank together."""
        state = self.snapshot(step)
        if self.d.is_main and len(set(state["rank_checksums"])) > 1:   # DDP keeps weights equal; say so if not
            self.log.print(f"warning: the ranks' weights differ at step {step} (checksums {state['rank_checksums']})")
        error = None
        try:
            self.ckpts.save(state, step)
        except CheckpointError as e:
            error = e
        if D.any_rank(error is not None, self.d):
            raise TrainingError(str(error) if error else "rank 0 could not write a checkpoint (see its message)")

    def _log_window(self, step: int, lr: float, window: dict) -> None:
        n = window["n"]
        steps_per_epoch = len(self.loader)
        scalars = D.mean_over_ranks({f"loss/{k}" if k.startswith("loss") else f"metric/{k}": s / n
                                     for k, s in window["sums"].items()}, self.d)
        scalars.update({"lr": lr, "epoch": step / steps_per_epoch,
                        "videos_per_s": n * self.global_batch / window["time"],
                        "data_wait_fraction": window["wait"] / window["time"]})
        if self.bad is not None:
            scalars["data/bad_samples"] = self.bad.count
        if self.d.device.type == "cuda":
            scalars["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.d.device) / 2**30
        self.log.log(step, scalars)
        if self.on_log:
            self.on_log(step, scalars)
