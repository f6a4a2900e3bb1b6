"""Smoke tests of the real-cluster test infrastructure (tests/cluster.py).

They prove what later tests of slurm/*.sbatch rely on: srun starts one task
per rank with SLURM_* variables that map onto torch.distributed's, a batch
script can trap USR1 and requeue itself, and Open MPI launches mpi4py ranks.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster import MpiLauncher, SlurmCluster

pytestmark = pytest.mark.slow

# One rank of a torch.distributed job, configured from srun's variables the way
# the project's launch scripts do it. Each rank reports to its own file in
# argv[1]: lines from two ranks sharing a stream may interleave mid-line.
GLOO_RANK = """\
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

os.environ["RANK"] = os.environ["SLURM_PROCID"]
os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
with open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w") as report:
    report.write(f"rank={rank} local_rank={os.environ['LOCAL_RANK']} world={world} sum={value.item():g}")
dist.destroy_process_group()
"""

# Arguments: python, program, report folder. MASTER_PORT comes from the submitting environment.
GLOO_BATCH = """\
#!/bin/bash
set -euo pipefail
echo "nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd,)"
# Loopback only: this test cluster is one node.
export MASTER_ADDR=127.0.0.1 GLOO_SOCKET_IFNAME=lo
srun "$1" "$2" "$3"
"""

# First run: wait to be signalled, then requeue itself as the pretraining job
# does after its checkpoint. Second run: report the restart count and finish.
# Argument: the file that tells the test the first run is waiting.
# The trap exits by itself: the SIGTERM that the requeue sends the job does not
# always end the batch shell (seen: bash reaped its killed child and went on).
REQUEUE_BATCH = """\
#!/bin/bash
echo "start restart_count=${SLURM_RESTART_COUNT-unset}"
if [[ ${SLURM_RESTART_COUNT:-0} -eq 0 ]]; then
    trap 'echo "got USR1"; scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1
    touch "$1"
    # A foreground sleep would delay the trap until it ends; wait returns at once.
    sleep 300 &
    wait $!
    echo "no USR1"
    exit 1
fi
echo "finished"
"""

MPI_PROGRAM = """\
import os
import sys

from mpi4py import MPI

comm = MPI.COMM_WORLD
total = comm.allreduce(comm.Get_rank() + 1, op=MPI.SUM)
with open(os.path.join(sys.argv[1], f"rank{comm.Get_rank()}.txt"), "w") as report:
    report.write(f"rank={comm.Get_rank()} size={comm.Get_size()} sum={total}")
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _rank_reports(folder: Path) -> list[str]:
    return [path.read_text() for path in sorted(folder.glob("rank*.txt"))]


def test_srun_two_ranks_gloo_allreduce(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    program = tmp_path / "rank.py"
    program.write_text(GLOO_RANK)
    script = _write_script(tmp_path / "gloo.sbatch", GLOO_BATCH)
    output = tmp_path / "gloo.out"

    reports = tmp_path / "reports"
    reports.mkdir()
    job = slurm_cluster.submit(
        script,
        [sys.executable, str(program), str(reports)],
        env={"MASTER_PORT": str(_free_port())},
        options=["--ntasks=2", f"--output={output}"],
    )
    state = slurm_cluster.wait(job, timeout=90)

    assert state == "COMPLETED", slurm_cluster.describe(job)
    assert f"nodes={slurm_cluster.node_name}" in output.read_text().splitlines()
    assert _rank_reports(reports) == [
        "rank=0 local_rank=0 world=2 sum=3",
        "rank=1 local_rank=1 world=2 sum=3",
    ], output.read_text()


def test_usr1_trap_requeues_and_second_run_completes(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    script = _write_script(tmp_path / "requeue.sbatch", REQUEUE_BATCH)
    output = tmp_path / "requeue.out"

    # append: a requeued job reopens its output file, truncating it by default.
    job = slurm_cluster.submit(
        script, [str(started)], options=["--open-mode=append", f"--output={output}"]
    )
    deadline = time.monotonic() + 30
    while not started.exists():
        state = slurm_cluster.state(job)
        if state not in {"PENDING", "RUNNING"} or time.monotonic() > deadline:
            pytest.fail(f"first run never got going ({state})\n{slurm_cluster.describe(job)}")
        time.sleep(0.2)
    # What `--signal=B:USR1@<t>` does near the time limit, without waiting for it.
    slurm_cluster.signal(job, "USR1")
    state = slurm_cluster.wait(job, timeout=60)

    assert state == "COMPLETED", slurm_cluster.describe(job)
    assert slurm_cluster.job_info(job)["Restarts"] == "1"
    text = output.read_text()
    # Ignore what slurmstepd and bash add when the requeue kills the first run.
    ours = ("start ", "got ", "no ", "finished")
    runs = [line for line in text.splitlines() if line.startswith(ours)]
    assert runs == [
        "start restart_count=unset",
        "got USR1",
        "start restart_count=1",
        "finished",
    ], text


def test_mpirun_two_ranks_mpi4py_allreduce(mpirun_cmd: MpiLauncher, tmp_path: Path) -> None:
    program = tmp_path / "mpi_rank.py"
    program.write_text(MPI_PROGRAM)

    result = subprocess.run(
        [*mpirun_cmd(2), sys.executable, str(program), str(tmp_path)],
        env=mpirun_cmd.env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert _rank_reports(tmp_path) == ["rank=0 size=2 sum=3", "rank=1 size=2 sum=3"]
