"""Checkpoints: atomic, periodic, on pre-emption signals, newest k kept, corrupt ones skipped on resume.

A checkpoint is one `torch.save` of plain containers and tensors (so it loads with `weights_only=True`):
objective state (encoders, heads, queues), optimiser, step/epoch, pipeline reader position, RNG states,
and the config. Only rank 0 writes; it writes `ckpt-<step>.pt` to a temp name, fsyncs and renames, so a
killed run never leaves a checkpoint that looks whole.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import warnings
from pathlib import Path

import numpy as np
import torch

NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


def rng_state() -> dict:
    """This process's RNG states. CUDA: only the generator of the device this process drives (under torchrun each
    rank drives one, cuda:LOCAL_RANK), as a one-element list."""
    np_state = np.random.get_state()
    cuda = [torch.cuda.get_rng_state(torch.cuda.current_device())] if torch.cuda.is_available() else []
    return {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": cuda,
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])]}


def cuda_rng_to_restore(saved: list, device: int, device_count: int) -> dict[int, torch.Tensor]:
    """{device index: state} to restore from a checkpoint's CUDA states, on a process that drives ``device`` and
    sees ``device_count`` GPUs. Only this process's own device is restored, whatever the writer saw: a current
    checkpoint holds one state per rank (its device's); an older one held every GPU the writer saw (eight on an
    8-GPU node), of which rank r's device was index r of its list. Restoring them all by index would reach past
    the GPUs of a smaller machine (IndexError), although resuming with another world size is supported."""
    if not saved or not 0 <= device < device_count:
        return {}
    return {device: saved[device] if len(saved) > 1 and device < len(saved) else saved[0]}


def set_rng_state(s: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        plan = cuda_rng_to_restore(s["cuda"], torch.cuda.current_device(), torch.cuda.device_count())
        for device, state in plan.items():
            torch.cuda.set_rng_state(state, device)
    name, keys, pos, gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(gauss), float(cached)))


class ResumeError(ValueError):
    """The checkpoint to resume from was written with settings that change the model or the sample stream."""


def resume_from(ckpts: "CheckpointManager", resume: str, identity: dict, parts: dict, d, stored=None) -> dict | None:
    """The one resume path (pretraining and fine-tuning): find the checkpoint to continue from, check it, restore
    ``parts`` (as given to ``snapshot``) and this rank's RNG from it, say so; its state, or None for a fresh start.

    ``resume``: "auto" (the newest readable checkpoint in ``ckpts``, if any), "none", or a checkpoint path.
    ``identity``: {key: value now} of everything a resumed run must agree on; ``stored(state)`` gives the
    checkpoint's (default: its "identity" entry). A difference is a ResumeError naming each key."""
    if resume == "none":
        return None
    found = ckpts.load_latest() if resume == "auto" else (CheckpointManager.load(resume), Path(resume))
    if not found:
        return None
    state, path = found
    old = stored(state) if stored else state.get("identity", {})
    diff = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
    if diff:
        raise ResumeError(f"{path} was written with other settings {diff} (checkpoint, now): use the same settings, "
                          "another output folder, or --resume none")
    restore(state, parts, d.rank)
    if d.is_main:
        loader = parts["loader"]
        print(f"resumed from {path} at step {state['step']} (epoch {loader.epoch}, batch {loader.step})")
    return state


def snapshot(parts: dict, d, **extra) -> dict:
    """A checkpoint's contents: ``parts`` (name -> object with state_dict(): model, optimizer, scaler, loader),
    every rank's RNG state and weights checksum (a collective: every rank calls it), and ``extra``."""
    from . import distributed as D
    per_rank = D.gather_objects((rng_state(), weights_checksum(parts["model"])), d)
    return {**{name: obj.state_dict() for name, obj in parts.items()}, "rng": [r for r, _ in per_rank],
            "rank_checksums": [c for _, c in per_rank], "world_size": d.world_size, **extra}


def restore(state: dict, parts: dict, rank: int) -> None:
    """Load ``parts`` (as given to ``snapshot``) and this rank's RNG state from a checkpoint."""
    for name, obj in parts.items():
        obj.load_state_dict(state[name])
    set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])


def weights_checksum(model: torch.nn.Module) -> str:
    """A SHA-256 of every parameter's bytes, in order (key encoders included): equal on every rank while DDP keeps
    them in sync, different for any bit that differs or any two values swapped. Buffers are left out: BatchNorm
    statistics are per rank by design (shuffle-BN), queues are equal."""
    h = hashlib.sha256()
    with torch.no_grad():
        for p in model.parameters():
            h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the message says what is left and how to resume)."""


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a crash right after it must not bring the old name back)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    def __init__(self, folder: str | Path, keep: int = 3, is_main: bool = True):
        self.folder = Path(folder)
        self.keep = max(1, keep)
        self.is_main = is_main
        if is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".ckpt-*.tmp"):   # half-written by a run killed mid-save
                stale.unlink(missing_ok=True)

    def paths(self) -> list[Path]:
        """Checkpoints, newest first."""
        found = [(int(m.group(1)), p) for p in self.folder.glob("ckpt-*.pt") if (m := NAME.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict, step: int) -> Path | None:
        if not self.is_main:
            return None
        path = self.folder / f"ckpt-{step:08d}.pt"
        tmp = self.folder / f".{path.name}.{os.getpid()}.tmp"
        # a pre-emption signal arriving mid-write must not interrupt it: hold them off until the rename
        with _signals_deferred():
            try:
                with open(tmp, "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                _fsync_dir(self.folder)
            except (OSError, RuntimeError) as e:    # disk full, quota, I/O error (torch.save wraps some in RuntimeError)
                tmp.unlink(missing_ok=True)
                previous = next(iter(self.paths()), None)
                raise CheckpointError(f"could not write the checkpoint of step {step} to {self.folder} "
                                      f"({type(e).__name__}: {str(e)[:200]}); nothing half-written was left. "
                                      + (f"The previous checkpoint {previous.name} is intact: free space and resume "
                                         "from it (--resume auto)" if previous else "No earlier checkpoint exists")
                                      ) from None
        for old in self.paths()[self.keep:]:
            old.unlink(missing_ok=True)
        return path

    @staticmethod
    def load(path: str | Path, map_location="cpu") -> dict:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} not found")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:   # truncated zip, wrong file, pickled objects that are not plain data
            raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:200]}); "
                             "it may be truncated by a killed copy: use an older one or --resume none") from None

    def load_latest(self, map_location="cpu") -> tuple[dict, Path] | None:
        """The newest checkpoint that loads; a corrupt one is skipped with a warning."""
        for p in self.paths():
            try:
                return self.load(p, map_location), p
            except ValueError as e:
                warnings.warn(f"skipping {e}", stacklevel=2)
        return None


def lock_run_folder(folder: Path):
    """Take an exclusive lock on `folder`/.lock, or raise if another process holds it.

    Two runs writing one out_dir would overwrite each other's checkpoints and logs. flock is released by the
    kernel when the process exits, however it exits, so a killed run never leaves a stale lock behind.
    Returns the open lock file: the lock lasts as long as a reference to it does."""
    import fcntl
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if not isinstance(e, BlockingIOError):   # a file system without flock (some Lustre/NFS mounts): go on unlocked
            warnings.warn(f"cannot lock {folder} ({e}); make sure no other run writes into it")
            return f
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RuntimeError(f"{folder} is in use by another run ({holder}): wait for it to finish, stop it, or give "
                           "this run another out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    return f


class _signals_deferred:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __enter__(self):
        self.pending, self.old = [], {}
        for s in self.SIGNALS:
            try:
                self.old[s] = signal.signal(s, lambda num, frame: self.pending.append(num))
            except ValueError:   # not the main thread: nothing to defer
                pass

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        for num in self.pending:
            signal.raise_signal(num)


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (cluster pre-emption, `scancel --signal`, torchrun shutdown); the loop checks it
    after each step, checkpoints and exits with EXIT_PREEMPTED so a scheduler requeues the job."""

    EXIT_PREEMPTED = 75   # EX_TEMPFAIL: "try again later", resume with --resume auto

    def __init__(self):
        self.signum = None
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def __bool__(self):
        return self.signum is not None
