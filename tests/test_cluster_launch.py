"""slurm/*.sbatch, mpirun and multi-node launches of pretrain/run.py, for real.

Every launch trains the same tiny job on 2 ranks and must log the same losses, bit for
bit, as one reference run by `deepspeed --num_gpus 2`: the data order and the seeds do not
depend on the launcher, and a checkpoint/resume (signal, requeue or --stop-at-step) must
not show in the losses. Each rank runs one thread (OMP_NUM_THREADS=1): on CPU the float
results depend on the thread count, and torchrun sets 1 where the others would not.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster import MpiLauncher, SlurmCluster
from corpus import documents, write_txt
from test_train import REPO, free_port, make_data, train_args, train_losses, val_losses

PRETRAIN_SBATCH = os.path.join(REPO, "slurm", "pretrain.sbatch")
PREPARE_SBATCH = os.path.join(REPO, "slurm", "prepare_data.sbatch")
STEPS = 40

# For every launch. Loopback: the test cluster is this one host.
RUN_ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHON": sys.executable}


def run_args(data: str, out: Path, *extra: object) -> list[str]:
    """The job of every test here: 40 steps, validation at 20 and 40, no periodic saves."""
    return train_args(data, out, "cpu_zero2.json", STEPS, "--eval-batches", 1, *extra)


def history(run_dir: Path) -> tuple[list, list]:
    return train_losses(run_dir), val_losses(run_dir)


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_data(tmp_path_factory.mktemp("launch_data") / "data", seed=31)


@pytest.fixture(scope="module")
def reference(data: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list]:
    """(train, validation) losses of one straight run under `deepspeed --num_gpus 2`."""
    out = tmp_path_factory.mktemp("reference") / "run"
    cmd = [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        os.path.join(REPO, "pretrain", "run.py"),
        *run_args(data, out),
    ]
    check(
        subprocess.run(
            cmd,
            cwd=REPO,
            env={**os.environ, **RUN_ENV},
            capture_output=True,
            text=True,
            timeout=600,
        )
    )
    losses = history(out)
    assert len(losses[0]) == STEPS and [s for s, *_ in losses[1]] == [20, STEPS]
    return losses


# -- slurm/pretrain.sbatch ---------------------------------------------------------------


@pytest.mark.slow
def test_sbatch_trains_two_ranks_and_completes(
    slurm_cluster: SlurmCluster, data: str, reference: tuple, tmp_path: Path
) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    # Submitted from the repository root, as documented; MASTER_ADDR is the script's
    # choice (the first host of the allocation); the port is free, not the job-id default,
    # because job ids restart at 1 in every test cluster on this machine.
    job = slurm_cluster.submit(
        PRETRAIN_SBATCH,
        run_args(data, run_dir),
        env={**RUN_ENV, "PROCS_PER_NODE": "2", "MASTER_PORT": str(free_port())},
        options=[f"--output={log}"],
        cwd=REPO,
    )
    state = slurm_cluster.wait(job, timeout=300)

    assert state == "COMPLETED", slurm_cluster.describe(job)
    text = log.read_text()
    assert f"node rank 0 of 1 on {slurm_cluster.node_name}: 2 ranks" in text, text
    assert f"master {slurm_cluster.node_name}:" in text, text
    assert "data parallel 2" in text and "--resume auto" in text, text
    assert "resumed from" not in text, "a fresh RUN_DIR starts fresh under --resume auto"
    assert latest(run_dir) == f"global_step{STEPS:06d}"
    assert history(run_dir) == reference


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_the_job_finishes_with_the_same_losses(
    slurm_cluster: SlurmCluster, data: str, reference: tuple, tmp_path: Path
) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    # Submitted from elsewhere: the script finds the repository from its own path.
    job = slurm_cluster.submit(
        PRETRAIN_SBATCH,
        run_args(data, run_dir),
        env={
            **RUN_ENV,
            "PROCS_PER_NODE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        },
        options=[f"--output={log}"],
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 240
    while not ((run_dir / "metrics.jsonl").exists() and len(train_losses(run_dir)) >= 3):
        state = slurm_cluster.state(job)
        if state not in {"PENDING", "RUNNING"} or time.monotonic() > deadline:
            pytest.fail(f"the job never logged 3 steps ({state})\n{slurm_cluster.describe(job)}")
        time.sleep(0.1)
    # What `--signal=B:USR1@<seconds>` does near the time limit.
    slurm_cluster.signal(job, "USR1")
    state = slurm_cluster.wait(job, timeout=300)

    assert state == "COMPLETED", slurm_cluster.describe(job)
    assert slurm_cluster.job_info(job)["Restarts"] == "1", slurm_cluster.describe(job)
    text = log.read_text()
    stopped = [line for line in text.splitlines() if line.startswith("run.py: stopped by a signal")]
    assert len(stopped) == 1, text
    step = int(stopped[0].split(" at step ")[1].split()[0])
    assert 3 <= step < STEPS, text
    assert "requeueing" in text and f"at step {step}\n" in text.split("resumed from", 1)[1], text
    assert "run.py: finished at step 40 of 40" in text, text
    assert latest(run_dir) == f"global_step{STEPS:06d}"
    assert history(run_dir) == reference


# -- mpirun and two launchers as two nodes -------------------------------------------------


@pytest.mark.slow
def test_mpirun_trains_and_resumes_with_the_same_losses(
    mpirun_cmd: MpiLauncher, data: str, reference: tuple, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"

    def mpirun(*extra: object) -> subprocess.CompletedProcess:
        cmd = [
            *mpirun_cmd(2),
            sys.executable,
            os.path.join(REPO, "pretrain", "run.py"),
            *run_args(data, run_dir, *extra),
        ]
        return check(
            subprocess.run(
                cmd,
                cwd=REPO,
                env={**mpirun_cmd.env, **RUN_ENV},
                capture_output=True,
                text=True,
                timeout=600,
            )
        )

    first = mpirun("--stop-at-step", 20)
    assert (
        "data parallel 2" in first.stderr and "stopped (--stop-at-step) at step 20" in first.stderr
    )
    assert latest(run_dir) == "global_step000020"
    second = mpirun("--resume", "auto")
    assert "resumed from" in second.stderr and "finished at step 40" in second.stderr

    assert history(run_dir) == reference


@pytest.mark.slow
def test_two_node_launchers_train_as_one_job(data: str, reference: tuple, tmp_path: Path) -> None:
    """The script's per-node path (what srun starts on each node) as node ranks 0 and 1 on
    this host, one rank each."""
    run_dir = tmp_path / "run"
    port = str(free_port())
    nodes = []
    for node_rank in (0, 1):
        env = {
            **os.environ,
            **RUN_ENV,
            "PRETRAIN_NODE_LAUNCH": "1",
            "PRETRAIN_REPO": REPO,
            "SLURM_NNODES": "2",
            "SLURM_NODEID": str(node_rank),
            "PROCS_PER_NODE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        nodes.append(
            subprocess.Popen(
                ["bash", PRETRAIN_SBATCH, *run_args(data, run_dir)],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, out[-2000:] + err[-3000:]

    assert "node rank 1 of 2" in outputs[1][1]
    assert "data parallel 2" in outputs[0][1], outputs[0][1][-3000:]
    assert history(run_dir) == reference


def test_node_launch_without_gpus_or_procs_per_node_is_a_clear_error(tmp_path: Path) -> None:
    # An nvidia-smi that lists no GPU, whatever this machine has.
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    env = {
        **os.environ,
        "PRETRAIN_NODE_LAUNCH": "1",
        "PRETRAIN_REPO": REPO,
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
    }
    for name in ("PROCS_PER_NODE", "SLURM_GPUS_ON_NODE"):
        env.pop(name, None)
    result = subprocess.run(["bash", PRETRAIN_SBATCH], env=env, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "set PROCS_PER_NODE=N" in result.stderr


# -- slurm/prepare_data.sbatch --------------------------------------------------------------

PREP_ARGS = [
    "--input",
    "corpus.txt",
    "--seq-len",
    "32",
    "--vocab-size",
    "200",
    "--shard-rows",
    "1500",
    "--unit-mb",
    "0.1",
]


def tree(data_dir: Path) -> dict[str, str]:
    """{path: sha256} of every file but the manifest, plus the manifest less its timings and
    command line."""
    found = {}
    for path in sorted(data_dir.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            found[str(path.relative_to(data_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = json.loads((data_dir / "manifest.json").read_text())
    del manifest["command"], manifest["stats"]["seconds"], manifest["stats"]["encode_seconds"]
    found["manifest.json"] = json.dumps(manifest, sort_keys=True)
    return found


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """corpus.txt (about 0.7 MB: seven units of 0.1 MB) and its single-run DATA_DIR."""
    folder = tmp_path_factory.mktemp("prep")
    write_txt(folder / "corpus.txt", documents(2000, seed=5))
    # From the same folder as the jobs: the manifest records --input as given.
    single = subprocess.run(
        [sys.executable, "-m", "data_prep", *PREP_ARGS, "--output", "single", "--workers", "1"],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    assert len(list((folder / "single" / "train").iterdir())) >= 3
    return folder


def job_states(cluster: SlurmCluster, job: int) -> list[str]:
    """JobState of each task of job (one for a plain job, one per array task)."""
    lines = cluster.run(["scontrol", "show", "job", "-o", str(job)]).stdout.splitlines()
    return sorted(line.split("JobState=")[1].split()[0] for line in lines)


def wait_all(cluster: SlurmCluster, jobs: list[int], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while cluster.run(["squeue", "-h", "-j", ",".join(map(str, jobs))]).stdout.strip():
        if time.monotonic() > deadline:
            raise TimeoutError("\n".join(cluster.describe(j) for j in jobs))
        time.sleep(0.25)


@pytest.mark.slow
def test_prepare_data_job_array_gives_the_bytes_of_one_run(
    slurm_cluster: SlurmCluster, corpus_dir: Path
) -> None:
    out = corpus_dir / "array"
    submitted = subprocess.run(
        ["bash", PREPARE_SBATCH, "3", *PREP_ARGS, "--output", "array"],
        cwd=corpus_dir,
        env={**slurm_cluster.env, **RUN_ENV},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    tokenizer, encode, pack = map(int, submitted.stdout.split())
    # Hold the pack job to see what the array did: the tokenizer job has just started.
    slurm_cluster.run(["scontrol", "hold", str(pack)])
    wait_all(slurm_cluster, [tokenizer, encode])

    assert job_states(slurm_cluster, tokenizer) == ["COMPLETED"], slurm_cluster.describe(tokenizer)
    assert job_states(slurm_cluster, encode) == ["COMPLETED"] * 3, slurm_cluster.describe(encode)
    units = sorted(p.name for p in (out / ".data_prep").glob("unit-*.json"))
    assert units == [f"unit-{i:05d}.json" for i in range(7)], "the three tasks encoded every unit"
    assert not (out / "manifest.json").exists()
    for task in range(3):
        log = (corpus_dir / f"slurm-{encode}_{task}.out").read_text()
        assert f"--task-index {task} --task-count 3" in log, log

    slurm_cluster.run(["scontrol", "release", str(pack)])
    assert slurm_cluster.wait(pack, timeout=120) == "COMPLETED", slurm_cluster.describe(pack)
    assert tree(out) == tree(corpus_dir / "single")


@pytest.mark.slow
def test_prepare_data_submitted_with_sbatch_submits_the_chain(
    slurm_cluster: SlurmCluster, corpus_dir: Path
) -> None:
    log = corpus_dir / "submitter.out"
    submitter = slurm_cluster.submit(
        PREPARE_SBATCH,
        ["2", *PREP_ARGS, "--output", "from_job"],
        env=RUN_ENV,
        options=[f"--output={log}"],
        cwd=corpus_dir,
    )
    assert slurm_cluster.wait(submitter, timeout=60) == "COMPLETED", slurm_cluster.describe(
        submitter
    )
    jobs = list(map(int, log.read_text().splitlines()[-1].split()))
    assert len(jobs) == 3, log.read_text()
    assert slurm_cluster.wait(jobs[2], timeout=180) == "COMPLETED", slurm_cluster.describe(jobs[2])
    assert job_states(slurm_cluster, jobs[1]) == ["COMPLETED"] * 2
    assert tree(corpus_dir / "from_job") == tree(corpus_dir / "single")


@pytest.mark.slow
def test_prepare_data_failed_step_cancels_the_rest_of_the_chain(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    submitted = subprocess.run(
        [
            "bash",
            PREPARE_SBATCH,
            "2",
            "--input",
            "missing.txt",
            "--output",
            "data",
            "--unit-mb",
            "1",
        ],
        cwd=tmp_path,
        env={**slurm_cluster.env, **RUN_ENV},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    tokenizer, encode, pack = map(int, submitted.stdout.split())

    assert slurm_cluster.wait(tokenizer, timeout=60) == "FAILED"
    assert "missing.txt" in (tmp_path / f"slurm-{tokenizer}.out").read_text()
    assert slurm_cluster.wait(pack, timeout=60) == "CANCELLED", slurm_cluster.describe(pack)
    assert set(job_states(slurm_cluster, encode)) == {"CANCELLED"}


def test_prepare_data_refuses_arguments_that_would_break_the_chain(tmp_path: Path) -> None:
    def submit(*args: str) -> subprocess.CompletedProcess:
        # Checked before anything is submitted: no SLURM needed.
        return subprocess.run(
            ["bash", PREPARE_SBATCH, *args], cwd=tmp_path, capture_output=True, text=True
        )

    no_units = submit("3", "--input", "c.txt", "--output", "d")
    assert no_units.returncode == 2 and "--unit-mb is required" in no_units.stderr
    no_count = submit("--input", "c.txt", "--output", "d", "--unit-mb", "1")
    assert no_count.returncode == 2 and "TASKS must be a positive number" in no_count.stderr
    phase = submit("2", "--input", "c.txt", "--output", "d", "--unit-mb", "1", "--phase", "all")
    assert phase.returncode == 2 and "--phase is set by this script" in phase.stderr
