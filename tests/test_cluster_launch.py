"""slurm/*.sbatch, mpirun and multi-node launches of pretrain/run.py, for real.

Every launch trains the same tiny job on 2 ranks and must log the same losses, bit for
bit, as one reference run by `deepspeed --num_gpus 2`: the data order and the seeds do not
depend on the launcher, and a checkpoint/resume (signal, requeue or --stop-at-step) must
not show in the losses. Each rank runs one thread (OMP_NUM_THREADS=1): on CPU the float
results depend on the thread count, and torchrun sets 1 where the others would not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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
def reference(
    data: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], tuple[list, list]]]:
    """``reference()``: (train, validation) losses of one straight run under `deepspeed
    --num_gpus 2`. The run starts in the background when a test first asks for the fixture,
    so that the test's own launch runs alongside; ``reference()`` waits for it."""
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

    def straight_run() -> tuple[list, list]:
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

    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(straight_run).result


# -- slurm/pretrain.sbatch ---------------------------------------------------------------


@pytest.mark.slow
def test_sbatch_trains_two_ranks_and_completes(
    slurm_cluster: SlurmCluster, data: str, reference: Callable, tmp_path: Path
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
    assert history(run_dir) == reference()


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_the_job_finishes_with_the_same_losses(
    slurm_cluster: SlurmCluster, data: str, reference: Callable, tmp_path: Path
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
    assert history(run_dir) == reference()


# -- mpirun and two launchers as two nodes -------------------------------------------------


@pytest.mark.slow
def test_mpirun_trains_and_resumes_with_the_same_losses(
    mpirun_cmd: MpiLauncher, data: str, reference: Callable, tmp_path: Path
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

    assert history(run_dir) == reference()


def node_env(node_rank: int, port: str) -> dict[str, str]:
    """The environment srun gives the script's per-node path on node ``node_rank`` of two
    (one rank each), all on this host."""
    return {
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


@pytest.mark.slow
def test_two_node_launchers_train_as_one_job(
    data: str, reference: Callable, tmp_path: Path
) -> None:
    """The script's per-node path (what srun starts on each node) as node ranks 0 and 1 on
    this host, one rank each."""
    run_dir = tmp_path / "run"
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            ["bash", PRETRAIN_SBATCH, *run_args(data, run_dir)],
            cwd=tmp_path,
            env=node_env(node_rank, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node_rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, out[-2000:] + err[-3000:]

    assert "node rank 1 of 2" in outputs[1][1]
    assert "data parallel 2" in outputs[0][1], outputs[0][1][-3000:]
    assert history(run_dir) == reference()


# -- a rank lost mid-run: the job ends, in bounded time ------------------------------------

# Generous upper limits for a loaded 2-core machine: measured there, a killed rank ended
# both node launchers within 4 s and mpirun within 2 s; a stopped one, the timeout + 4 s.
LOST_BOUND = 60
LOST_LINE = re.compile(
    r"^run\.py: error: rank (\d+) lost contact with another rank \((.+)\); "
    r"exiting so the job can be requeued$",
    re.MULTILINE,
)


def long_run_args(data: str, out: Path, *extra: object) -> list[str]:
    """A job that cannot finish before the test interrupts it."""
    return train_args(data, out, "cpu_zero2.json", 1000, "--eval-batches", 1, *extra)


def job_pids(marker: str) -> list[int]:
    """Live processes whose command line holds ``marker`` (this test's RUN_DIR): launchers,
    ranks, and ranks orphaned by a launcher (torchrun starts each in its own session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if marker.encode() in argv and not zombie:
            found.append(int(entry.name))
    return found


def rank_pid(marker: str, rank: int) -> int:
    """The pid of the pretrain/run.py process of ``rank`` in the job of ``marker``."""
    for pid in job_pids(marker):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        is_rank = any(arg.endswith(b"pretrain/run.py") for arg in argv[1:3])  # not a launcher
        if is_rank and env.get(b"OMPI_COMM_WORLD_RANK", env.get(b"RANK")) == str(rank).encode():
            return pid
    raise AssertionError(f"no rank {rank} among {job_pids(marker)}")


def leftovers(marker: str, grace: float = 15) -> list[int]:
    """The job's processes still alive ``grace`` seconds after its launchers exited (a
    launcher's kill of its ranks may trail its own exit)."""
    deadline = time.monotonic() + grace
    while job_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    return job_pids(marker)


def end_job(marker: str, procs: list[subprocess.Popen]) -> None:
    """SIGKILL whatever of the job still runs (a stopped process too) and reap it."""
    for pid in job_pids(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def wait_for_steps(run_dir: Path, steps: int, procs: list[subprocess.Popen], logs: list[Path]):
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").exists() and len(train_losses(run_dir)) >= steps):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            tails = "\n".join(log.read_text()[-3000:] for log in logs)
            pytest.fail(
                f"the job never logged {steps} steps ({[p.poll() for p in procs]})\n{tails}"
            )
        time.sleep(0.1)


def wait_exit(procs: list[subprocess.Popen], seconds: float) -> list[float | None]:
    """Seconds until each of ``procs`` exited, None for those still running after
    ``seconds``."""
    started = time.monotonic()
    ended: list[float | None] = [None] * len(procs)
    while any(e is None for e in ended) and time.monotonic() - started < seconds:
        for i, proc in enumerate(procs):
            if ended[i] is None and proc.poll() is not None:
                ended[i] = time.monotonic() - started
        time.sleep(0.1)
    return ended


def start_node_launchers(data: str, run_dir: Path, tmp_path: Path, *extra: object):
    """Node ranks 0 and 1 of a two-node job, as in the test above; output to files."""
    port = str(free_port())
    logs = [tmp_path / f"node{node_rank}.log" for node_rank in (0, 1)]
    nodes = []
    for node_rank, log in enumerate(logs):
        with open(log, "w") as out:
            nodes.append(
                subprocess.Popen(
                    ["bash", PRETRAIN_SBATCH, *long_run_args(data, run_dir, *extra)],
                    cwd=tmp_path,
                    env=node_env(node_rank, port),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return nodes, logs


def lost_lines(text: str, rank: int) -> list[str]:
    return [m.group(0) for m in LOST_LINE.finditer(text) if m.group(1) == str(rank)]


@pytest.mark.slow
def test_two_node_launch_ends_when_the_rank_of_the_other_node_is_killed(
    data: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    nodes, logs = start_node_launchers(data, run_dir, tmp_path)
    try:
        wait_for_steps(run_dir, 3, nodes, logs)
        os.kill(rank_pid(str(run_dir), 1), signal.SIGKILL)
        ended = wait_exit(nodes, LOST_BOUND)
        texts = [log.read_text() for log in logs]
        assert None not in ended, (
            f"still running {LOST_BOUND} s after the kill: {ended}\n{texts[0][-3000:]}"
        )
        assert [node.returncode != 0 for node in nodes] == [True, True], texts[0][-3000:]
        line = lost_lines(texts[0], 0)
        assert len(line) == 1 and "Connection" in line[0], texts[0][-3000:]
        # rank 0's own exit code (torchrun itself exits 1) and no traceback of the rank
        assert re.search(r"exitcode\s*:\s*75\b", texts[0]), texts[0][-3000:]
        assert "RuntimeError" not in texts[0], texts[0][-3000:]
        assert not leftovers(str(run_dir)), "a process outlived the job"
    finally:
        end_job(str(run_dir), nodes)


@pytest.mark.slow
def test_two_node_launch_ends_after_the_collective_timeout_when_a_rank_stops_answering(
    data: str, tmp_path: Path
) -> None:
    # SIGSTOP: the rank's sockets stay open, like a node lost without closing connections;
    # only --collective-timeout ends node 0's wait
    run_dir, timeout = tmp_path / "run", 15
    nodes, logs = start_node_launchers(data, run_dir, tmp_path, "--collective-timeout", timeout)
    try:
        wait_for_steps(run_dir, 3, nodes, logs)
        stopped = rank_pid(str(run_dir), 1)
        os.kill(stopped, signal.SIGSTOP)
        (ended,) = wait_exit(nodes[:1], timeout + LOST_BOUND)
        text = logs[0].read_text()
        assert ended is not None, f"node 0 still running {timeout + LOST_BOUND} s after the stop"
        assert nodes[0].returncode != 0, text[-3000:]
        line = lost_lines(text, 0)
        assert len(line) == 1 and "Timed out" in line[0], text[-3000:]

        # Continued, rank 1 finds rank 0 gone and ends too (under srun, --kill-on-bad-exit
        # would have ended node 1 already).
        os.kill(stopped, signal.SIGCONT)
        (ended,) = wait_exit(nodes[1:], LOST_BOUND)
        text = logs[1].read_text()
        assert ended is not None and nodes[1].returncode != 0, text[-3000:]
        assert len(lost_lines(text, 1)) == 1, text[-3000:]
    finally:
        end_job(str(run_dir), nodes)  # SIGKILL ends a stopped process too


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["SIGKILL", "SIGSTOP"])
def test_mpirun_ends_when_a_rank_is_lost(
    mpirun_cmd: MpiLauncher, data: str, tmp_path: Path, lost: str
) -> None:
    run_dir, log, timeout = tmp_path / "run", tmp_path / "mpirun.log", 15
    cmd = [
        *mpirun_cmd(2),
        sys.executable,
        os.path.join(REPO, "pretrain", "run.py"),
        *long_run_args(data, run_dir, "--collective-timeout", timeout),
    ]
    with open(log, "w") as out:
        job = subprocess.Popen(
            cmd,
            cwd=REPO,
            # a free port: DeepSpeed's MPI discovery would take 29500, as other jobs may
            env={**mpirun_cmd.env, **RUN_ENV, "MASTER_PORT": str(free_port())},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_steps(run_dir, 3, [job], [log])
        os.kill(rank_pid(str(run_dir), 1), getattr(signal, lost))
        bound = LOST_BOUND if lost == "SIGKILL" else timeout + LOST_BOUND
        (ended,) = wait_exit([job], bound)
        text = log.read_text()
        assert ended is not None, f"mpirun still running {bound} s after the {lost}"
        assert job.returncode != 0, text[-3000:]
        if lost == "SIGSTOP":
            # rank 0 timed out first, so mpirun reports its code; a normal interpreter exit
            # would hang here in mpi4py's MPI_Finalize, waiting for the stopped rank
            assert job.returncode == 75, text[-3000:]
            assert len(lost_lines(text, 0)) == 1 and "Timed out" in text, text[-3000:]
        assert "RuntimeError" not in text, text[-3000:]
        assert not leftovers(str(run_dir)), "a rank outlived mpirun"
    finally:
        end_job(str(run_dir), [job])


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


def test_lost_contact_tells_a_lost_peer_from_other_errors() -> None:
    from pretrain.distributed import lost_contact

    # gloo's messages in torch 2.13 for a killed peer, a stopped one, and one gone later
    gloo = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/{}] {}"
    reset = gloo.format(
        "pair.cc:537",
        "Read error [127.0.0.1]:43433: Connection reset by peer. This is typically caused "
        "by a remote worker hanging or bugs in the application. Check the logs",
    )
    timed_out = gloo.format(
        "unbound_buffer.cc:78", "Timed out waiting 15000ms for recv operation to complete"
    )
    closed = gloo.format("pair.cc:1", "Connection closed by peer [127.0.0.1]:40106")
    assert (
        lost_contact(RuntimeError(reset))
        == "Read error [127.0.0.1]:43433: Connection reset by peer"
    )
    assert lost_contact(RuntimeError(timed_out)) == (
        "Timed out waiting 15000ms for recv operation to complete"
    )
    try:  # raised from inside another error (an autograd hook, a wrapper)
        try:
            raise RuntimeError(closed)
        except RuntimeError as inner:
            raise ValueError("while reducing gradients") from inner
    except ValueError as outer:
        assert lost_contact(outer) == "Connection closed by peer [127.0.0.1]:40106"
    for other in (
        RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
        ValueError("[not gloo] Connection reset by peer"),
        OSError(28, "No space left on device"),
    ):
        assert lost_contact(other) is None, other
