"""Process-group set-up for every launcher, and the few collectives the trainer uses.

Ranks come from the environment whatever started them: the ``deepspeed`` launcher and
torchrun set RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; under ``mpirun``
DeepSpeed's MPI discovery derives them from Open MPI's variables (through mpi4py);
``slurm/pretrain.sbatch`` maps SLURM's. A single process with none of these runs as a
world of one. The backend is DeepSpeed's choice: NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import time

import torch
import torch.distributed as dist


def _under_mpi() -> bool:
    return "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ


def init() -> None:
    """Initialise torch.distributed through DeepSpeed (idempotent)."""
    import deepspeed

    if dist.is_initialized():
        return
    if "RANK" not in os.environ and not _under_mpi():
        # a plain `python pretrain/run.py`: a world of one on a free local port
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # under mpirun DeepSpeed's discovery picks the port: MASTER_PORT, else 29500
    port = int(os.environ.get("MASTER_PORT", 29500))
    deepspeed.init_distributed(auto_mpi_discovery=True, distributed_port=port, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        _unlink_shm_workspace()


def _unlink_shm_workspace() -> None:
    """Remove the name of DeepSpeed's CPU all-reduce workspace from /dev/shm.

    On CPU, when all ranks share one machine, DeepSpeed's shm comm op gives every rank a
    64 MiB workspace named ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` in
    /dev/shm and never unlinks it, so each run left 64 MiB per rank of tmpfs (that is, RAM)
    behind: a few hundred runs filled a 24 GiB machine. The peers map each other's
    workspace once, during initialisation; after a barrier every mapping exists, so the
    names can go at once (the addr:port pair makes the name this run's). The memory is
    freed when the last rank exits, however it exits.
    """
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank()
    )
    dist.barrier()  # on every rank: whether a rank has a workspace is not ours to know
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join("/dev/shm", name))


def shutdown() -> None:
    """Quiesce and destroy the process groups before the interpreter exits.

    A gloo worker thread drops the tensors of a finished collective only once it gets the
    GIL; if the interpreter is finalizing by then, the thread is killed inside C++ code
    and the whole process aborts after all its work is done ("terminate called without an
    active exception", exit code 250 or 134; seen in this project's tests). So: a barrier
    (all collectives done on every rank), the groups destroyed, then the GIL released for a
    moment, so that gloo's threads can let go of what they hold while Python still runs.
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
    time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_rank() -> int:
    """This process's rank as the launcher set it (before torch.distributed starts)."""
    return int(os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)


def launcher_world_size() -> int:
    """The number of ranks the launcher started (before torch.distributed starts)."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or 1)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else launcher_rank()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else launcher_world_size()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float], group=None) -> list[float]:
    """Sum a few float64 numbers over ``group`` (one small collective)."""
    backend_device = device() if dist.get_backend(group) == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=backend_device)
    dist.all_reduce(t, group=group)
    return t.tolist()
