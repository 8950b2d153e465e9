"""train.*: the trainer's own step (train/recipe.py) on the configured objective: loss, time, memory, bf16 vs fp32, the largest batch."""
from __future__ import annotations

import copy
import math
import re
import sys
import time
import traceback

from .core import PASS, WARN, LOSS_RTOL, GiB, Skip, Fail, Result, _gib, _mib, _mem_available


# What a failed allocation looks like besides torch.cuda.OutOfMemoryError (the caching allocator's): cuDNN and
# cuBLAS allocate their workspaces and handles themselves and report a plain RuntimeError ("cuDNN error:
# CUDNN_STATUS_ALLOC_FAILED", cuDNN 9's "..._INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED", "CUBLAS_STATUS_ALLOC_FAILED
# when calling `cublasCreate(handle)`"), and a kernel launch that cannot get memory gives "CUDA error: out of memory".
_OOM_MARKERS = re.compile(r"out of memory|ALLOC_FAILED|ALLOCATION_FAILED", re.IGNORECASE)


def is_oom(e: BaseException) -> bool:
    """Did this exception come from running out of GPU memory (so a smaller batch may fit)?"""
    import torch
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and bool(_OOM_MARKERS.search(str(e))))


def gpu_memory_limit(total: int, limit_gib: float | None, dali_bytes: int, name: str = "GPU") -> tuple[int, str]:
    """(bytes the training step may use, how that was worked out): the GPU's memory (or a smaller
    --memory-limit-gib) less what DALI holds on the same GPU while it feeds the run (its memory pool, NVDEC
    surfaces: measured by decode.gpu), which the training step's own peak does not include."""
    limit = min(total, limit_gib * GiB) if limit_gib else total
    source = f"--memory-limit-gib {limit_gib:g}" if limit_gib and limit_gib * GiB < total else f"{name} memory"
    if dali_bytes > 0:
        limit = max(0, limit - dali_bytes)
        source += f" less {_gib(dali_bytes)} held by DALI's GPU pipeline"
    return int(limit), source


class TrainChecks:
    def _template(self):
        """The configured objective, built once on the CPU with the run's seed (copied for every step)."""
        if "template" not in self._cache:
            from model import build_objective
            from ..recipe import objective_kwargs
            self.torch.manual_seed(self.cfg["seed"])
            model = build_objective(self.cfg["objective"], **objective_kwargs(self.cfg))
            model.train()
            self._cache["template"] = model
        return self._cache["template"]

    def _state_bytes(self) -> int:
        """Bytes of one checkpoint: weights, buffers (queues) and the optimiser's state."""
        torch = self.torch
        model = self._cache.get("template")
        if model is None:
            from model import build_objective
            from ..recipe import objective_kwargs
            try:
                with torch.device("meta"):
                    model = build_objective(self.cfg["objective"], **objective_kwargs(self.cfg))
            except Exception:
                model = self._template()
        state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        return state + self._optimizer_states() * trainable

    def _optimizer_states(self) -> int:
        """Tensors the optimiser keeps per trainable weight: SGD momentum 1 (0 without), Adam 2."""
        if self.cfg.get("optimizer", "sgd") == "adam":
            return 2
        return 1 if self.cfg["momentum"] > 0 else 0

    def _inputs(self, size: int, channels_last: bool):
        """A batch of `size` for the objective: the decoded samples (tiled), or synthetic clips when none."""
        torch = self.torch
        model = self._template()
        dec = None
        for key in (("decode", "gpu", None), ("decode", "cpu", None)):
            if key in self._cache:
                dec = self._cache[key]["batch"]
                break
        T, S = self.cfg["frames"], self.cfg["crop"]
        out = {}
        g = torch.Generator().manual_seed(self.cfg["seed"])
        for k in model.required_inputs:
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

    def _step(self, size: int, precision: str, channels_last: bool, backward: bool = True) -> dict:
        """One forward/backward/SGD update of a fresh copy of the objective (cached per arguments). With
        backward=False only the forward runs (enough for the CPU memory estimate, which counts gradients and
        momentum from the weights)."""
        key = ("step", size, precision, channels_last, backward)
        if key in self._cache:
            return self._cache[key]
        torch = self.torch
        from ..distributed import Dist
        from ..recipe import build_optimizer, precision_context, train_step
        dev, gpu = self.device, self.device.type == "cuda"
        res = {"batch": size, "precision": precision, "channels_last": channels_last, "backward": backward,
               "ok": False}
        model = opt = batch = out = None
        try:
            if gpu:
                torch.cuda.synchronize(dev)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            model = copy.deepcopy(self._template()).to(dev)
            if channels_last:
                model = model.to(memory_format=torch.channels_last_3d)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = build_optimizer(self.cfg, params, lr=1e-5)   # the trainer's optimiser (its states take memory)
            scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
            batch, real = self._inputs(size, channels_last)
            res["inputs"] = "decoded samples" if real else "synthetic clips"
            own = {p.untyped_storage().data_ptr() for p in model.parameters()}
            own |= {b.untyped_storage().data_ptr() for b in model.buffers()}
            own |= {v.untyped_storage().data_ptr() for v in batch.values()}
            saved: dict[int, int] = {}

            def pack(t):
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
            loss = out["loss"]
            if gpu:
                torch.cuda.synchronize(dev)
            res["time_s"] = time.perf_counter() - t0
            res["loss"] = float(loss.detach())
            res["terms"] = {k: float(v.detach()) for k, v in out.items() if v.numel() == 1}
            res["finite"] = math.isfinite(res["loss"])
            weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            grads = sum(p.numel() * p.element_size() for p in params)
            inputs = sum(v.numel() * v.element_size() for v in batch.values())
            res["saved_bytes"] = sum(saved.values())
            states = self._optimizer_states()
            res["estimate_bytes"] = weights + (1 + states) * grads + inputs + res["saved_bytes"]
            res["fixed_bytes"] = weights + (1 + states) * grads
            if gpu:
                res["peak_bytes"] = torch.cuda.max_memory_allocated(dev)
                res["peak_source"] = "torch.cuda.max_memory_allocated"
            else:
                res["peak_bytes"] = res["estimate_bytes"]
                res["peak_source"] = "estimate: weights + grads + optimiser state + inputs + saved activations"
            res["ok"] = True
        except Exception as e:
            if gpu and is_oom(e):
                res["oom"] = True
                res["error"] = f"out of memory at batch {size}"
            else:
                res["traceback"] = traceback.format_exc()
                res["error"] = f"{type(e).__name__}: {e}"
        finally:
            del model, opt, batch, out
            if gpu:
                torch.cuda.empty_cache()
        self._cache[key] = res
        return res

    def _dali_gpu_bytes(self) -> int:
        """GPU memory outside torch's allocator while DALI's GPU pipeline ran (measured by decode.gpu, see
        DoctorBase._decode), less what was outside it before (the CUDA context): DALI's pool and NVDEC surfaces."""
        r = self._cache.get(("decode", "gpu", None))
        return int(r.get("gpu_bytes_outside_torch", 0)) if r else 0

    def _plan(self):
        """Batch sizes and layouts of the training-step checks on this device."""
        gpu = self.device.type == "cuda"
        B = self.cfg["batch_size"]
        cl = bool(self.cfg["channels_last"]) and gpu      # channels_last_3d is a GPU layout
        prec = self.cfg["precision"]
        if gpu:      # the configured batch, and half of it for the memory fit
            sizes = (B, max(1, B // 2)) if B > 1 else (1, 2)
        else:        # batch 2 (1 leaves BatchNorm a single value on small feature maps), and 1 for the fit
            sizes = (min(B, 2), 1 if B >= 2 else 2)
        return gpu, B, prec, cl, sizes

    def _main_step(self) -> dict:
        """The configured precision and layout at the first planned size (GPU: after a warm-up step; a batch
        that does not fit is halved until one does, and train.step reports the OOM)."""
        if "train_main" in self._cache:
            return self._cache["train_main"]
        gpu, B, prec, cl, sizes = self._plan()
        size = sizes[0]
        if gpu:      # the trainer's settings
            from ..recipe import cuda_switches
            cuda_switches(self.cfg["cudnn_benchmark"])
            warm = self._step(size, prec, cl)           # cuDNN autotuning, allocator warm-up
            while warm.get("oom") and size > 1:
                self._cache["train_oom_at"] = B
                size //= 2
                warm = self._step(size, prec, cl)
            if warm.get("ok"):
                self._cache.pop(("step", size, prec, cl, True))   # time a second, warm step
        r = self._step(size, prec, cl)
        self._cache["train_main"] = r
        return r

    def check_train_step(self) -> Result:
        gpu, B, prec, cl, sizes = self._plan()
        r = self._main_step()
        if self._cache.get("train_oom_at") or r.get("oom"):
            raise Fail(f"batch_size={B} ({prec}) does not fit on {self.torch.cuda.get_device_name(self.device)}"
                       + (f"; batch {r['batch']} does" if r.get("ok") else ""),
                       "lower batch_size (train.batch says the largest that fits), or crop/frames")
        if not r["ok"]:
            print(r.get("traceback", ""), file=sys.stderr)
            raise Fail(r.get("error", "the step failed"), "the configured objective does not train here: see the "
                       "traceback on stderr; try precision=fp32 to tell numerics from code problems")
        layout = "channels_last_3d" if cl else "contiguous"
        fig = (f"{prec} {layout}, batch {r['batch']} ({r['inputs']}): loss {r['loss']:.4g}, step {r['time_s']:.2f} s, "
               f"{r['batch'] / r['time_s']:.2f} videos/s, peak {_gib(r['peak_bytes'])}")
        m = {k: r[k] for k in ("batch", "precision", "channels_last", "loss", "terms", "time_s", "peak_bytes",
                               "peak_source", "inputs")}
        m["videos_per_s"] = r["batch"] / r["time_s"]
        if r["batch"] != B:
            est = r["time_s"] * B / r["batch"]
            m["step_s_at_batch_size_estimate"] = est
            fig += f"; ~{est:.1f} s at batch {B} (linear)"
        if not r["finite"]:
            raise Fail(fig, f"non-finite loss in {prec}: try precision=fp32; if that is finite, keep fp32 or lower lr; "
                       "if not, inspect the data (decode.cpu) and the config", m)
        return Result("", PASS, fig, measured=m)

    def check_train_bf16(self) -> Result:
        gpu, B, prec, cl, sizes = self._plan()
        torch = self.torch
        size = sizes[0]
        if gpu and not torch.cuda.is_bf16_supported():
            status_fix = "this GPU has no bf16: set precision=fp16 (autocast + grad scaler) or fp32"
            if prec == "bf16":
                raise Fail(f"{torch.cuda.get_device_name(self.device)}: no bf16 support", status_fix)
            raise Skip(f"{torch.cuda.get_device_name(self.device)} has no bf16 support (the run uses {prec})")
        if gpu:
            self._main_step()
            main = self._cache["train_main"]
            size = main["batch"] if main.get("ok") else size
        while True:
            ref = self._step(size, "fp32", False)
            low = self._step(size, "bf16", gpu)      # + channels_last_3d on a GPU
            if not (ref.get("oom") or low.get("oom")) or size == 1:
                break
            size //= 2                               # fp32 needs more memory than the run's bf16
        for r in (ref, low):
            if not r["ok"]:
                if r.get("oom"):
                    raise Fail(f"{r['precision']} at batch {size}: out of memory", "lower batch_size (see train.batch)")
                print(r.get("traceback", ""), file=sys.stderr)
                raise Fail(f"{r['precision']}: {r.get('error')}", "see the traceback on stderr")
        f, b = ref["terms"], low["terms"]
        # A term behind a discrete selection (FIMA's dense term: foreground cells above the median, positives by
        # a distance threshold; its count is the metric dense_pos_cells) jumps when bf16 moves a value across
        # the threshold: when such a count differs, that term and the total are not compared, the others are.
        flipped = [k for k in f if not k.startswith(("loss", "acc")) and k in b and f[k] != b[k]]
        excluded = {"loss"} | {f"loss_{k.split('_')[0]}" for k in flipped} if flipped else set()
        compared = [k for k in f if k.startswith("loss") and k in b and k not in excluded] or ["loss"]
        diffs = {k: abs(b[k] - f[k]) for k in compared}
        tols = {k: LOSS_RTOL * max(1.0, abs(f[k])) for k in compared}
        worst = max(compared, key=lambda k: diffs[k] / tols[k])
        layout = " + channels_last_3d" if gpu else " (CPU autocast, contiguous)"
        inside = sum(diffs[k] <= tols[k] for k in compared)
        fig = (f"batch {size}: loss fp32 {ref['loss']:.4f} ({ref['time_s']:.2f} s), bf16{layout} {low['loss']:.4f} "
               f"({low['time_s']:.2f} s); {inside} of {len(compared)} loss terms within {LOSS_RTOL:.0%} of "
               f"max(1, |fp32|), worst {worst} |diff| {diffs[worst]:.4f} (tolerance {tols[worst]:.4f})")
        if flipped:
            fig += ("; not compared: " + ", ".join(sorted(excluded)) + " (" +
                    ", ".join(f"{k} {f[k]:.3g} vs {b[k]:.3g}" for k in flipped) + ": a discrete selection flipped)")
        m = {"batch": size, "fp32_loss": ref["loss"], "bf16_loss": low["loss"], "compared": compared,
             "abs_diff": diffs, "tolerance": tols, "not_compared": sorted(excluded), "fp32_s": ref["time_s"],
             "bf16_s": low["time_s"], "bf16_channels_last_3d": gpu, "fp32_terms": f, "bf16_terms": b}
        needs_bf16 = prec == "bf16" and (gpu or self.run_backend == "cpu")    # this device trains in bf16
        if not all(math.isfinite(v) for v in f.values()):
            raise Fail(fig, "the fp32 loss is not finite: the model or the data is broken here (see train.step)", m)
        if not all(math.isfinite(v) for v in b.values()):
            fix = "bf16 gives a non-finite loss: use precision=fp32 (or fp16 with its grad scaler) on this device"
            if needs_bf16:
                raise Fail(fig, fix, m)
            return Result("", WARN, fig, fix + " (the run does not use bf16 here)", m)
        if diffs[worst] > tols[worst]:
            return Result("", WARN, fig, f"bf16 and fp32 disagree on {worst} more than expected: train with "
                          "precision=fp32 for a few steps and compare the logged losses", m)
        return Result("", PASS, fig, measured=m)

    def check_train_batch(self) -> Result:
        torch = self.torch
        gpu, B, prec, cl, sizes = self._plan()
        main = self._main_step()
        dali_bytes = 0
        if gpu:
            total = torch.cuda.get_device_properties(self.device).total_memory
            dali_bytes = self._dali_gpu_bytes()
            limit, source = gpu_memory_limit(total, self.limit_gib, dali_bytes,
                                              torch.cuda.get_device_name(self.device))
        else:
            if self.limit_gib:
                limit, source = self.limit_gib * GiB, f"--memory-limit-gib {self.limit_gib:g}, simulated"
            else:
                limit, source = _mem_available(), "available RAM"
        if not main.get("ok"):
            raise Fail("no training step succeeded", "see train.step")
        b_main = main["batch"]
        if b_main == sizes[0] and sizes[1] != b_main:
            b_other = sizes[1]
        else:
            b_other = b_main // 2 if b_main > 1 else 2
        other = self._step(b_other, prec, cl, backward=gpu)   # CPU: the estimate needs only the forward
        if not other.get("ok") and not other.get("oom") and b_other < b_main:   # e.g. BatchNorm at batch 1
            other = self._step(b_main + 1, prec, cl, backward=gpu)
        points = {r["batch"]: r for r in (main, other) if r.get("ok")}
        if len(points) < 2:
            raise Fail("could not measure two batch sizes", other.get("error") or "see train.step")
        (b1, r1), (b2, r2) = sorted(points.items())[:2]
        per = max((r2["peak_bytes"] - r1["peak_bytes"]) / (b2 - b1), 1.0)
        fixed = r1["peak_bytes"] - per * b1
        budget = limit * (0.95 if gpu else 1.0)       # GPU: leave room for the allocator's fragmentation
        predicted = fixed + per * B
        largest = int((budget - fixed) // per)
        m = {"limit_bytes": limit, "limit_source": source, "dali_gpu_bytes": dali_bytes, "per_sample_bytes": per, "fixed_bytes": fixed,
             "predicted_bytes_at_batch_size": predicted, "batch_size": B, "largest_batch_estimate": largest,
             "fit_points": {str(b): p["peak_bytes"] for b, p in points.items()}, "precision": prec,
             "peak_source": r1["peak_source"]}
        if gpu and largest >= 1:        # verify by running it (capped to keep the check quick)
            trial, verified = min(largest, 8 * max(B, 1), 1024), None
            for _ in range(3):
                if trial <= max(points):
                    verified = trial
                    break
                r = self._step(trial, prec, cl)
                if r.get("ok"):
                    verified = trial
                    break
                trial = int(trial * 0.85)
            m["largest_batch_verified"] = verified
            largest = verified if verified is not None else largest
        if gpu:     # the configured batch ran on this GPU: it fits unless a smaller --memory-limit-gib says not
            fits = main["batch"] == B and not self._cache.get("train_oom_at") and main["peak_bytes"] <= limit
            if fits:
                largest = max(largest, B)
        else:
            fits = predicted <= budget and largest >= B
        fig = (f"{_mib(fixed)} + {_mib(per)}/video ({prec}, fit over batch {b1} and {b2}): batch {B} needs "
               f"{_gib(predicted)} of {_gib(limit)} ({source}); largest that fits: {max(largest, 0)}")
        if gpu:
            v = m.get("largest_batch_verified")
            fig += (" (not verified: the trial steps failed)" if v is None else
                    " (ran; search capped at 8x the batch)" if v >= min(8 * max(B, 1), 1024) else " (ran)")
        if largest < 1:
            raise Fail(fig, "does not fit even at batch 1: lower crop or frames, use a smaller backbone (backbone=r3d18), "
                       "a smaller queue_size, or a device with more memory", m)
        if not fits:
            raise Fail(fig, f"batch_size={B} does not fit: lower batch_size to {largest} (the largest that fits; "
                       f"keep the global batch by running more processes), or lower crop/frames", m)
        return Result("", PASS, fig, measured=m)

    # ------------------------------------------------------------------ dist
