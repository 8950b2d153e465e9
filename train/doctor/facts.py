"""What the checks look at, computed in one place: `Facts` holds the config and works out each fact (the shard
set, the sampled samples, decoded batches, the objective, training steps) the first time a check asks, then keeps
it, so several checks share one measurement and a check that is not selected costs nothing."""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
import time
import traceback
from functools import cached_property
from pathlib import Path

from .core import ASSUMED_GPU_VIDEOS_PER_S, Fail, Skip

# What a failed allocation looks like besides torch.cuda.OutOfMemoryError (the caching allocator's): cuDNN and
# cuBLAS allocate their workspaces and handles themselves and report a plain RuntimeError ("cuDNN error:
# CUDNN_STATUS_ALLOC_FAILED", cuDNN 9's "..._INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED", "CUBLAS_STATUS_ALLOC_FAILED
# when calling `cublasCreate(handle)`"), and a kernel launch that cannot get memory gives "CUDA error: out of memory".
_OOM_MARKERS = re.compile(r"out of memory|ALLOC_FAILED|ALLOCATION_FAILED", re.IGNORECASE)


def is_oom(e: BaseException) -> bool:
    """Did this exception come from running out of GPU memory (so a smaller batch may fit)?"""
    import torch
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and bool(_OOM_MARKERS.search(str(e))))


def has_nvidia_driver() -> bool:
    """An NVIDIA kernel module is loaded: a GPU node, even where torch cannot use its GPUs."""
    return Path("/proc/driver/nvidia/version").exists()


class Facts:
    """The config, this process's place in the run, the results so far, and every fact a check needs. A fact is a
    `cached_property` (or, when it takes arguments, a method with its own memo); `computed(name)` reads one
    only if some check already paid for it."""

    def __init__(self, cfg: dict, selected: list[str], samples: int = 8, memory_limit_gib: float | None = None,
                 preset: str | None = None):
        import torch
        from ..recipe import device_and_backend
        self.torch = torch
        self.cfg, self.selected, self.n_samples, self.memory_limit_gib, self.preset = (
            cfg, selected, samples, memory_limit_gib, preset)
        self.results: dict = {}             # check name -> Result, filled by the runner in run order
        self.cuda = torch.cuda.is_available()
        self.use_cuda, self.run_backend = device_and_backend(cfg)     # the trainer's rule and CUDA switches
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.device = torch.device("cuda", self.local_rank) if self.use_cuda else torch.device("cpu")
        self._decoded: dict = {}            # (backend, outputs) -> decoded(): the memo of one method
        self._steps: dict = {}              # (size, precision, channels_last, backward) -> step(): likewise

    def computed(self, name: str):
        """The fact `name` if a check already computed it, else None: for figures that use a measurement when
        there is one but must not start it."""
        return self.__dict__.get(name)

    # ------------------------------------------------------------------ the machine
    def require_cuda(self, what: str) -> None:
        """For a GPU-only check: return on a usable GPU; otherwise SKIP with why there is none, or FAIL where the
        run needs the GPU."""
        if self.cuda:
            return
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        if self.torch.version.cuda is None:
            why = f"no CUDA device: torch {self.torch.__version__} is a CPU-only build"
        elif cvd is not None and cvd.strip() in ("", "-1", "none", "NoDevFiles"):
            why = f"no CUDA device: CUDA_VISIBLE_DEVICES={cvd!r} hides every GPU"
        else:
            why = "no CUDA device: torch.cuda.is_available() is False (no GPU visible, or no working driver)"
        if self.cfg["backend"] == "gpu":
            raise Fail(why, f"backend=gpu needs a CUDA device for {what}: run on a GPU node (check `nvidia-smi`, the "
                       "container's --gpus flag), or set backend=cpu (VP9 shards)")
        if self.cfg["backend"] == "auto" and has_nvidia_driver() and "CUDA_VISIBLE_DEVICES" not in why:
            raise Fail(why + ", but an NVIDIA driver is loaded",
                       "backend=auto would silently train on the CPU: install a CUDA build of torch for this driver "
                       "(see env.torch, env.driver), or set backend=cpu on purpose")
        raise Skip(why)

    @cached_property
    def cuda_majors(self) -> tuple[int | None, int | None, str]:
        """(torch's CUDA major, DALI's CUDA major, DALI distribution name)."""
        torch_major = int(self.torch.version.cuda.split(".")[0]) if self.torch.version.cuda else None
        dali_major, dist_name = None, ""
        from importlib import metadata
        for d in metadata.distributions():
            name = (d.metadata.get("Name") or "").lower()
            m = re.fullmatch(r"nvidia-dali(?:-nightly)?-cuda(\d+)", name)
            if m:
                dist_name, dali_major = name, int(m.group(1)) // 10
                break
        if dali_major is None:
            try:
                import nvidia.dali as dali
                v = int(getattr(dali, "__cuda_version__", 0) or 0)
                dali_major = v // 1000 if v else None
            except ImportError:
                pass
        return torch_major, dali_major, dist_name

    def gpu_bytes_outside_torch(self) -> int:
        """Bytes in use on this process's GPU that torch's caching allocator does not hold (CUDA context, DALI)."""
        torch = self.torch
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        return int(total - free - torch.cuda.memory_reserved(self.device))

    # ------------------------------------------------------------------ the data
    @cached_property
    def _shard_set(self) -> dict | Fail:
        """Manifest, tar paths and parsed indexes of the configured shard set, or the Fail saying what to do."""
        from preprocess import shard_format as fmt
        try:
            if not self.cfg["data"]:
                raise Fail("no data configured", "set data=OUT/train (a shard set written by `python -m preprocess`)")
            data = Path(self.cfg["data"])
            try:
                # without the per-sample list: data.samples looks up the records of the samples it reads
                manifest = fmt.load_manifest(data, samples=False)
            except (FileNotFoundError, ValueError) as e:
                raise Fail(f"no usable shard set at {data}", str(e))
            listed = manifest["shards"]
            try:
                tars = fmt.shard_paths(data, manifest)
            except FileNotFoundError as e:
                names = sorted({Path(s["file"]).stem for s in listed for f in (data / s["file"], fmt.index_path(
                    data / s["file"])) if not f.is_file()})
                raise Fail(f"{len(names)} of {len(listed)} shards listed in manifest.json missing or without index "
                           f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})", str(e))
            indexes = []
            for tar in tars:
                idx = fmt.index_path(tar)
                try:
                    indexes.append(fmt.read_index(idx))
                except (ValueError, IndexError) as e:
                    raise Fail(f"{idx.name}: unreadable index", f"{idx}: {e}: re-run `python -m preprocess` on this "
                               "set (it resumes and rewrites the index), or copy the shard folder again")
        except Fail as e:
            return Fail(*(e.args + ("", ""))[:2])
        return {"dir": data, "manifest": manifest, "tars": tars, "indexes": indexes}

    @property
    def shards(self) -> dict:
        """The shard set (see _shard_set). When it is unusable the first check to ask FAILs with what to do; the
        checks after data.shards, which already said so, SKIP."""
        s = self._shard_set
        if not isinstance(s, Fail):
            return s
        if "data.shards" in self.results:
            raise Skip(f"needs the shard set: {s.args[0]} (see data.shards)")
        raise Fail(*s.args)

    @cached_property
    def samples(self) -> dict:
        """The N sampled samples read in full, with everything that disagrees: {"infos": [...], "problems": [...]}."""
        s = self.shards
        manifest, tars, indexes = s["manifest"], s["tars"], s["indexes"]
        n_classes = len(manifest.get("classes") or [])
        spread = _spread(self.n_samples, [len(ix) for ix in indexes])
        reads = [_read_sample(tars[t], t, j, indexes[t][j]) for t, j in spread]
        records, listed = _records(s["dir"], [info["key"] for _, info, _, _ in reads])
        infos, problems = [], []
        for where, info, part, found in reads:     # per sample: its tar members, then its bytes against its records
            infos.append(info)
            problems += found + _check_sample(where, info, part, records.get(info["key"]), listed, n_classes)
        return {"infos": infos, "problems": problems}

    @property
    def sample_codecs(self) -> set[str]:
        """The MP4 fourccs of the sampled samples."""
        return {i.get("codec", "") for i in self.samples["infos"]} - {""}

    def decoded(self, backend: str, outputs: tuple | None = None) -> dict:
        """N samples through pretrain_loader on `backend` (kept per arguments): the batch and the timings.
        `outputs` defaults to what the configured objective requires (the model is the contract)."""
        if (backend, outputs) in self._decoded:
            return self._decoded[backend, outputs]
        torch = self.torch
        from pipeline import pretrain_loader
        from ..recipe import aug_config
        c = self.cfg
        bs = max(1, self.n_samples // 2)
        nb = math.ceil(self.n_samples / bs)
        gpu = backend == "gpu"
        want = outputs or tuple(self.model_template.required_inputs)     # as the trainer asks for it
        outside0 = self.gpu_bytes_outside_torch() if gpu else 0
        loader = pretrain_loader(c["data"], want, batch_size=bs, config=aug_config(c), seed=c["seed"],
                                 backend=backend, device_id=self.local_rank if gpu else None,
                                 num_threads=c["num_threads"], prefetch=1)
        try:
            batches, times, it = [], [], iter(loader)
            t0 = time.perf_counter()
            for _ in range(min(nb, len(loader))):
                batches.append(next(it))
                if gpu:
                    torch.cuda.synchronize(self.device)
                t1 = time.perf_counter()
                times.append(t1 - t0)
                t0 = t1
            short = loader.stats["short"]
            # what DALI holds on the GPU while it feeds a run (its pool, NVDEC surfaces): train.batch's budget
            dali_bytes = max(0, self.gpu_bytes_outside_torch() - outside0) if gpu else 0
        finally:
            loader.close()
        batch = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        videos = bs * len(batches)     # the first batch includes building the pipeline: timed apart when there are more
        vps = bs * (len(times) - 1) / sum(times[1:]) if len(times) > 1 else videos / times[0]
        self._decoded[backend, outputs] = {
            "batch": batch, "videos": videos, "batch_size": bs, "first_s": times[0], "vps": vps,
            "steady": len(times) > 1, "short": int(short), "gpu_bytes_outside_torch": dali_bytes}
        return self._decoded[backend, outputs]

    @property
    def dali_gpu_bytes(self) -> int:
        """GPU memory outside torch's allocator while DALI's GPU pipeline ran (measured by decode.gpu), less what
        was outside it before (the CUDA context): DALI's pool and NVDEC surfaces. 0 when decode.gpu did not run."""
        r = self._decoded.get(("gpu", None))
        return int(r.get("gpu_bytes_outside_torch", 0)) if r else 0

    def consumption(self, per_rank: bool = False) -> tuple[float, str]:
        """Videos/s this node's training (or, ``per_rank``, one rank's) would consume, and how that was worked out."""
        procs = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or (self.torch.cuda.device_count() if self.use_cuda else 1)
        where = f"x {procs} process(es) on this node"
        if per_rank:
            procs, where = 1, "for one rank (each rank decodes on its own GPU)"
        run = self.computed("main_step")
        if run and run.get("ok"):
            per = run["batch"] / run["time_s"]
            return per * procs, f"{per:.2f} videos/s measured by train.step {where}"
        if self.use_cuda:
            return ASSUMED_GPU_VIDEOS_PER_S * procs, (f"assumed {ASSUMED_GPU_VIDEOS_PER_S:.0f} videos/s per GPU "
                                                      f"{where} (no train.step measured)")
        return 1.0, "assumed 1 video/s on a CPU (no train.step measured)"

    def decode_need(self, backend: str) -> tuple[float, str]:
        """Videos/s one decoding pipeline of ``backend`` must deliver. GPU: every rank decodes on its own GPU's
        NVDEC, so decode.gpu (one GPU's rate) is compared with one rank's consumption. CPU: the ranks' pipelines
        share the node's cores, so decode.cpu is compared with the whole node's (as data.read)."""
        return self.consumption(per_rank=backend == "gpu")

    # ------------------------------------------------------------------ the objective and its training step
    @cached_property
    def model_template(self):
        """The configured objective, built once on the CPU with the run's seed (copied for every step)."""
        from model import build_objective
        from ..recipe import objective_kwargs
        self.torch.manual_seed(self.cfg["seed"])
        model = build_objective(self.cfg["objective"], **objective_kwargs(self.cfg))
        model.train()
        return model

    @property
    def optimizer_states(self) -> int:
        """Tensors the optimiser keeps per trainable weight: SGD momentum 1 (0 without), Adam 2."""
        if self.cfg.get("optimizer", "sgd") == "adam":
            return 2
        return 1 if self.cfg["momentum"] > 0 else 0

    @cached_property
    def checkpoint_bytes(self) -> int:
        """Bytes of one checkpoint: weights, buffers (queues) and the optimiser's state. Counted on the template
        when a check built it, else on a weightless (meta) copy, which costs no memory or time."""
        model = self.computed("model_template")
        if model is None:
            from model import build_objective
            from ..recipe import objective_kwargs
            try:
                with self.torch.device("meta"):
                    model = build_objective(self.cfg["objective"], **objective_kwargs(self.cfg))
            except Exception:
                model = self.model_template
        state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        return state + self.optimizer_states * trainable

    @cached_property
    def plan(self) -> tuple[bool, int, str, bool, tuple[int, int]]:
        """(on a GPU, batch_size, precision, channels_last, the two batch sizes the step checks run)."""
        gpu = self.device.type == "cuda"
        B = self.cfg["batch_size"]
        cl = bool(self.cfg["channels_last"]) and gpu      # channels_last_3d is a GPU layout
        if gpu:      # the configured batch, and half of it for the memory fit
            sizes = (B, max(1, B // 2)) if B > 1 else (1, 2)
        else:        # batch 2 (1 leaves BatchNorm a single value on small feature maps), and 1 for the fit
            sizes = (min(B, 2), 1 if B >= 2 else 2)
        return gpu, B, self.cfg["precision"], cl, sizes

    @cached_property
    def main_step(self) -> dict:
        """The configured precision and layout at the first planned size (GPU: after a warm-up step; a batch
        that does not fit is halved until one does, with "oom_at" = batch_size, and train.step reports it)."""
        gpu, B, prec, cl, sizes = self.plan
        size, oom_at = sizes[0], None
        if gpu:      # the trainer's settings
            from ..recipe import cuda_switches
            cuda_switches(self.cfg["cudnn_benchmark"])
            warm = self.step(size, prec, cl)            # cuDNN autotuning, allocator warm-up
            while warm.get("oom") and size > 1:
                oom_at = B
                size //= 2
                warm = self.step(size, prec, cl)
            if warm.get("ok"):
                self._steps.pop((size, prec, cl, True))    # time a second, warm step
        return {**self.step(size, prec, cl), "oom_at": oom_at}

    def step_inputs(self, size: int, channels_last: bool):
        """A batch of `size` for the objective: the decoded samples (tiled), or synthetic clips when none."""
        torch = self.torch
        dec = next((self._decoded[k]["batch"] for k in (("gpu", None), ("cpu", None)) if k in self._decoded), None)
        T, S = self.cfg["frames"], self.cfg["crop"]
        out = {}
        g = torch.Generator().manual_seed(self.cfg["seed"])
        for k in self.model_template.required_inputs:
            if dec is not None and k in dec:
                v = dec[k]
                v = v.index_select(0, (torch.arange(size) % v.shape[0]).to(v.device))
            elif k.startswith("box"):
                v = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(size, 1)
            elif k == "frame_hw":
                v = torch.tensor([[256.0, 342.0]]).repeat(size, 1)
            elif k.startswith("raw"):
                v = torch.rand(size, 3, T, S, S, generator=g)
            else:
                v = torch.randn(size, 3, T, S, S, generator=g)
            v = v.to(self.device)
            if v.dim() == 5:
                v = v.contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
            out[k] = v
        return out, dec is not None

    def step(self, size: int, precision: str, channels_last: bool, backward: bool = True) -> dict:
        """One forward/backward/update of a fresh copy of the objective (kept per arguments). With backward=False
        only the forward runs (enough for the CPU memory estimate, which counts gradients and optimiser state
        from the weights)."""
        key = (size, precision, channels_last, backward)
        if key in self._steps:
            return self._steps[key]
        torch = self.torch
        from ..distributed import Dist
        from ..recipe import build_optimizer, precision_context, train_step
        dev, gpu = self.device, self.device.type == "cuda"
        res = {"batch": size, "precision": precision, "channels_last": channels_last, "ok": False}
        model = opt = batch = out = None
        try:
            if gpu:
                torch.cuda.synchronize(dev)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            model = copy.deepcopy(self.model_template).to(dev)
            if channels_last:
                model = model.to(memory_format=torch.channels_last_3d)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = build_optimizer(self.cfg, params, lr=1e-5)   # the trainer's optimiser (its states take memory)
            scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
            batch, real = self.step_inputs(size, channels_last)
            res["inputs"] = "decoded samples" if real else "synthetic clips"
            own = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers(),
                                                                            batch.values())}
            saved: dict[int, int] = {}

            def pack(t):      # the tensors autograd saves for backward: the activations' memory on a CPU
                try:
                    st = t.untyped_storage()
                    ptr = st.data_ptr()
                    if ptr not in own:
                        saved[ptr] = st.nbytes()
                except Exception:
                    pass
                return t

            torch.manual_seed(self.cfg["seed"])          # the same dropout / permutations in every run
            t0 = time.perf_counter()
            amp = precision_context(precision, dev)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                if backward:                             # the trainer's own step (train/recipe.py)
                    out, _ = train_step(model, batch, opt, scaler, amp, Dist(device=dev))
                else:
                    with amp:
                        out = model(batch)
            if gpu:
                torch.cuda.synchronize(dev)
            res.update(time_s=time.perf_counter() - t0, loss=float(out["loss"].detach()),
                       terms={k: float(v.detach()) for k, v in out.items() if v.numel() == 1})
            res["finite"] = math.isfinite(res["loss"])
            weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            grads = sum(p.numel() * p.element_size() for p in params)
            inputs = sum(v.numel() * v.element_size() for v in batch.values())
            if gpu:
                res.update(peak_bytes=torch.cuda.max_memory_allocated(dev), peak_source="torch.cuda.max_memory_allocated")
            else:
                res.update(peak_bytes=weights + (1 + self.optimizer_states) * grads + inputs + sum(saved.values()),
                           peak_source="estimate: weights + grads + optimiser state + inputs + saved activations")
            res["ok"] = True
        except Exception as e:
            if gpu and is_oom(e):
                res.update(oom=True, error=f"out of memory at batch {size}")
            else:
                res.update(traceback=traceback.format_exc(), error=f"{type(e).__name__}: {e}")
        finally:
            del model, opt, batch, out
            if gpu:
                torch.cuda.empty_cache()
        self._steps[key] = res
        return res


# --------------------------------------------------------------------------------------------- reading samples


def _spread(n: int, counts: list[int]) -> list[tuple[int, int]]:
    """n (shard, position) pairs spread evenly over the whole set of shards holding `counts` samples."""
    total = sum(counts)
    n = min(n, total)
    flat = sorted({round(i * (total - 1) / max(1, n - 1)) for i in range(n)}) if n > 1 else [0]
    starts = list(itertools.accumulate(counts, initial=0))
    out = []
    for g in flat:
        t = max(i for i, s in enumerate(starts[:-1]) if s <= g and counts[i] > 0)
        out.append((t, g - starts[t]))
    return out


def _records(data: Path, keys: list[str]) -> tuple[dict, bool]:
    """The manifest's records of ``keys`` and whether its per-sample list holds any (a key missing from a manifest
    that lists records is a problem): found in the list's text (shard_format.manifest_records), the whole list
    parsed only when it is laid out otherwise."""
    from preprocess import shard_format as fmt
    lean = fmt.manifest_records(data / fmt.MANIFEST, [k for k in keys if k])
    if lean is not None:
        return lean
    try:
        listed = json.loads((data / fmt.MANIFEST).read_text()).get("samples") or []
    except ValueError as e:
        raise Fail(f"no usable shard set at {data}", str(e))
    every = {r.get("key"): r for r in listed if isinstance(r, dict)}
    return {k: every[k] for k in keys if k in every}, bool(every)


def _read_sample(tar: Path, t: int, j: int, comps: dict) -> tuple[str, dict, dict, list[str]]:
    """Sample j of shard t read in full and checked against its tar headers: (where, what it is, its members'
    bytes, the problems found)."""
    from preprocess import integrity
    where = f"{tar.name} sample {j}"
    fd = os.open(tar, os.O_RDONLY)
    try:
        headers = integrity.read_headers(fd, comps)
        lo = min(o for o, _ in comps.values())
        hi = max(o + z for o, z in comps.values())
        span = os.pread(fd, hi - lo, lo)
    finally:
        os.close(fd)
    found = integrity.sample_member_problems(comps, headers)
    keys = {integrity.member_key(headers[e][0]) for e in comps if e not in {p.ext for p in found}}
    part = {ext: span[o - lo:o - lo + z] for ext, (o, z) in comps.items()}
    info = {"shard": t, "key": next(iter(keys)) if len(keys) == 1 else "", "tar": str(tar), "lo": lo, "hi": hi}
    return where, info, part, [f"{where}: {p.words}" for p in found]


def _check_sample(where: str, info: dict, part: dict, rec: dict | None, listed: bool, n_classes: int) -> list[str]:
    """A sample's bytes against its manifest record ``rec`` (``listed``: the manifest lists records) and its MP4;
    fills in info's nf, codec and size."""
    import numpy as np
    from pipeline.container import parse_mp4
    from preprocess import integrity, shard_format as fmt
    t, problems = info["shard"], []
    found = integrity.sample_problems(part, rec, n_classes)
    unreadable = [p for p in found if p.kind == "unreadable" and p.ext != fmt.META_EXT]
    if unreadable:
        return [f"{where}: {unreadable[0].words}"]
    info["nf"] = fmt.unpack_int32(part[fmt.FRAMES_EXT])
    problems += [f"{where}: {p.words}" for p in found]
    meta, _ = integrity.read_meta(part)
    try:
        track = parse_mp4(np.frombuffer(part[fmt.VIDEO_EXT], dtype=np.uint8)) if fmt.VIDEO_EXT in part else None
    except Exception as e:
        track = None
        problems.append(f"{where}: the video is not a readable MP4 ({type(e).__name__}: {e})")
    info.update(codec=track.codec if track else "", width=track.width if track else meta.get("width"),
                height=track.height if track else meta.get("height"))
    if track is not None and track.num_samples and track.num_samples < info["nf"]:
        problems.append(f"{where}: nf {info['nf']} but the MP4 holds {track.num_samples} frames")
    if track is not None and meta.get("width") and (meta["width"], meta["height"]) != (track.width, track.height):
        problems.append(f"{where}: JSON says {meta['width']}x{meta['height']}, the MP4 is "
                        f"{track.width}x{track.height}")
    if listed and info["key"] and rec is None:
        problems.append(f"{where}: key {info['key']!r} is not in the manifest")
    if rec is not None and rec.get("shard", t) != t:
        problems.append(f"{where}: the manifest puts {info['key']!r} in shard {rec['shard']}")
    return problems

