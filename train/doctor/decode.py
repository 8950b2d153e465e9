"""decode.*: the codec, the GPU decoder cache, CPU and GPU decoding through the real pipeline, and their agreement,
each a function of the Facts."""
from __future__ import annotations

from preprocess import shard_format

from .core import PASS, WARN, FAIL, FRAME_TOL_MEAN, FRAME_TOL_P99, FRAME_FAIL_MEAN, Skip, Fail, Result
from .facts import Facts


def check_codec(facts: Facts) -> Result:
    from pipeline.shards import CPU_CODECS, GPU_ONLY_CODECS
    s = facts.shards
    enc = str((s["manifest"].get("encoding") or {}).get("codec", "?"))
    codecs = sorted(facts.sample_codecs)
    names = sorted({CPU_CODECS.get(c) or GPU_ONLY_CODECS.get(c) or c for c in codecs})
    m = {"manifest_codec": enc, "fourccs": codecs, "backend": facts.run_backend}
    fig = f"shards {enc} ({', '.join(codecs) or 'no MP4 fourcc'}), backend {facts.run_backend}"
    named = shard_format.codec_named(enc)
    gpu_only = [c for c in codecs if c not in CPU_CODECS] or ([enc] if named is not None and not named.cpu else [])
    if facts.run_backend == "cpu" and gpu_only:
        raise Fail(fig + f": DALI's CPU decoder cannot decode {', '.join(names) or enc}",
                   "re-shard with --codec vp9 (`python -m preprocess SRC OUT --codec vp9`; DALI's CPU backend "
                   f"decodes {shard_format.cpu_decodable_text()} only), or train on GPUs with backend=gpu", m)
    if len(codecs) > 1:
        return Result("", WARN, fig, "several codecs in one set: each switch costs a new GPU decoder; re-shard "
                      "with one --codec", m)
    return Result("", PASS, fig, measured=m)


def check_cache(facts: Facts) -> Result:
    s = facts.shards
    enc = s["manifest"].get("encoding") or {}
    size = enc.get("size")
    infos = facts.samples["infos"]
    from preprocess.shard_format import frame_sizes
    sizes = frame_sizes(infos)
    # DALI 2.4 looks a free decoder up by coded size but files it under the display size: a side that is not a
    # multiple of 16 (coded sizes are padded to the block size) never hits the cache (DESIGN.md §8)
    padded = sorted(k for k in sizes if any(int(v) % 16 for v in k.split("x")))
    m = {"sizes": sizes, "manifest_size": size, "one_size": len(sizes) <= 1, "unaligned": padded,
         "cache_friendly": not padded, "align": enc.get("align", 2)}
    how = "fixed by the manifest's --size" if size else "short side fixed, widths follow the sources"
    fig = f"{len(sizes)} coded size(s) in {len(infos)} samples: {', '.join(sizes) or '?'} ({how})"
    problems = []
    if padded:
        short = min(int(v) for k in padded for v in k.split("x"))
        problems.append(f"{', '.join(padded)} not a multiple of 16: coded size != display size, so DALI's GPU "
                        "decoder cache misses on every sample (a new NVDEC decoder, tens of ms, per video); "
                        f"re-shard with this version's default --align 16 (`python -m preprocess SRC OUT "
                        f"--short-side {short - short % 16 or 16}`)")
    if len(sizes) > 1:
        common = max(sizes, key=sizes.get)
        w, h = (int(v) for v in common.split("x"))
        fixed = f"{w - w % 16 or 16}x{h - h % 16 or 16}"
        problems.append(f"every new size creates a GPU decoder (tens of ms, more than a short clip's decode): "
                        f"re-shard with one size, `python -m preprocess SRC OUT --size {fixed}`")
    if problems:
        if facts.run_backend == "gpu":
            return Result("", WARN, fig, "; ".join(problems), m)
        return Result("", PASS, fig + " (matters only on backend=gpu)", "; ".join(problems), m)
    return Result("", PASS, fig + "; 16-aligned, the NVDEC decoder cache can be reused", measured=m)


def _shards_intact(facts: Facts, gpu_what: str = "") -> None:
    """Decoding needs a shard set whose indexes describe its tars: SKIP when data.shards found they do not. With
    `gpu_what` (a GPU check), first a usable GPU, and a run that decodes on it."""
    if gpu_what:
        facts.require_cuda(gpu_what)
        if facts.cfg["backend"] == "cpu":
            raise Skip("backend=cpu: the run does not decode on the GPU")
    facts.shards                      # raises when there is no usable shard set
    if facts.results.get("data.shards") and facts.results["data.shards"].status == FAIL:
        raise Skip("the indexes do not describe the tars (see data.shards): nothing to decode")


def check_cpu(facts: Facts) -> Result:
    _shards_intact(facts)
    from pipeline import CodecError
    from pipeline.shards import CPU_CODECS
    codecs = facts.sample_codecs
    if facts.run_backend == "gpu" and codecs - set(CPU_CODECS):
        raise Skip(f"the shards are {', '.join(sorted(codecs))}, which only the GPU decodes (the run uses backend=gpu)")
    try:
        r = facts.decoded("cpu")
    except CodecError as e:
        raise Fail("DALI's CPU decoder cannot decode these shards", str(e))
    return _decoded_result(facts, r)


def check_gpu(facts: Facts) -> Result:
    _shards_intact(facts, "NVDEC decoding")
    return _decoded_result(facts, facts.decoded("gpu"))


def _decoded_result(facts: Facts, r: dict) -> Result:
    """decode.cpu/decode.gpu's row: the speed, and whether the pipeline gave every input the objective requires."""
    torch = facts.torch
    batch = r["batch"]
    want = tuple(facts.model_template.required_inputs)
    T, S = facts.cfg["frames"], facts.cfg["crop"]
    bad = [k for k in want if k not in batch]
    clips = [k for k in want if k in batch and batch[k].dim() == 5]
    bad += [f"{k} {tuple(batch[k].shape)}" for k in clips if batch[k].shape[1] != 3 or
            tuple(batch[k].shape[-2:]) != (S, S) or (facts.cfg["objective"] != "multilevel" and batch[k].shape[2] != T)]
    bad += [f"{k} not finite" for k in clips if not bool(torch.isfinite(batch[k]).all())]
    m = {"videos": r["videos"], "videos_per_s": r["vps"], "first_batch_s": r["first_s"], "steady": r["steady"],
         "batch_size": r["batch_size"], "short_videos": r["short"], "outputs": sorted(batch)}
    how = "after the first batch" if r["steady"] else "incl. building the pipeline"
    fig = (f"{r['vps']:.1f} videos/s ({how}; {r['videos']} videos, batch {r['batch_size']}, "
           f"num_threads={facts.cfg['num_threads']}); {len(clips)} clips [3,{T},{S},{S}] finite")
    if r["short"]:
        fig += f"; {r['short']} shorter than a window (edge-padded)"
    if bad:
        raise Fail(fig, f"unexpected pipeline outputs {bad}: this pipeline build is broken; run tests/test_pipeline_*", m)
    return Result("", PASS, fig, measured=m)


def check_match(facts: Facts) -> Result:
    _shards_intact(facts, "the CPU/GPU comparison")
    from pipeline.shards import CPU_CODECS
    codecs = facts.sample_codecs
    if codecs - set(CPU_CODECS):
        raise Skip(f"{', '.join(sorted(codecs))} has no CPU decoder to compare with")
    torch = facts.torch
    # un-augmented crops ("raw": cropped RGB in [0, 1]) with the same seed: same frames, same crops
    a = facts.decoded("cpu", ("raw_m",))["batch"]["raw_m"].float()
    b = facts.decoded("gpu", ("raw_m",))["batch"]["raw_m"].float().cpu()
    d = (a - b).abs().flatten() * 255
    mean = float(d.mean())
    p99 = float(torch.quantile(d[torch.randperm(d.numel())[:1_000_000]], 0.99))
    m = {"mean_abs_0_255": mean, "p99_abs_0_255": p99, "max_abs_0_255": float(d.max()),
         "tolerance": {"mean": FRAME_TOL_MEAN, "p99": FRAME_TOL_P99}}
    fig = (f"|CPU-GPU| mean {mean:.2f}, p99 {p99:.1f} of 255 (tolerance mean <= {FRAME_TOL_MEAN:g}, "
           f"p99 <= {FRAME_TOL_P99:g}: YUV->RGB conversion and resampling differ slightly)")
    if mean > FRAME_FAIL_MEAN:
        raise Fail(fig, "the GPU decodes different frames or crops than the CPU: update DALI, or report it with "
                   "this output; until then train with backend=cpu to stay on the tested path", m)
    if mean > FRAME_TOL_MEAN or p99 > FRAME_TOL_P99:
        return Result("", WARN, fig, "more difference than expected from colour conversion: check a few frames "
                      "of both backends visually (this DALI/driver build may convert colour differently)", m)
    return Result("", PASS, fig, measured=m)

