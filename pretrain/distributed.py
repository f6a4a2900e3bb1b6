"""Process-group set-up for every launcher, and the few collectives the trainer uses.

Ranks come from the environment whatever started them: the ``deepspeed`` launcher and
torchrun set RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; under ``mpirun``
DeepSpeed's MPI discovery derives them from Open MPI's variables (through mpi4py);
``slurm/pretrain.sbatch`` maps SLURM's. A single process with none of these runs as a
world of one. The backend is DeepSpeed's choice: NCCL on GPUs, gloo on CPU.

A peer that dies closes its sockets, and a collective waiting on it fails at once; a peer
that stops answering with its connections open (a hung process, a node lost without a
reset) is noticed only when the collective's timeout runs out. :func:`lost_contact` tells
such failures from others, so that ``run.py`` can end the rank instead of hanging.
"""

from __future__ import annotations

import datetime
import gc
import os
import re
import socket
import time
import warnings

import torch
import torch.distributed as dist


def _under_mpi() -> bool:
    return "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ


def init(timeout: datetime.timedelta | None = None) -> None:
    """Initialise torch.distributed through DeepSpeed (idempotent).

    ``timeout`` bounds how long any collective of any process group waits for the other
    ranks (also how long start-up waits for all ranks to join); None leaves the defaults:
    DeepSpeed's 10 minutes (``DEEPSPEED_TIMEOUT``) for the world group, torch's 30 minutes
    on gloo and 10 on NCCL for the groups DeepSpeed creates.
    """
    import deepspeed

    if dist.is_initialized():
        return
    if timeout is not None:
        _default_group_timeout(timeout)
    if "RANK" not in os.environ and not _under_mpi():
        # a plain `python pretrain/run.py`: a world of one on a free local port
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        _without_shm_all_reduce()
    # under mpirun DeepSpeed's discovery picks the port: MASTER_PORT, else 29500
    port = int(os.environ.get("MASTER_PORT", 29500))
    kwargs = {} if timeout is None else {"timeout": timeout}
    deepspeed.init_distributed(
        auto_mpi_discovery=True, distributed_port=port, verbose=False, **kwargs
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def _default_group_timeout(timeout: datetime.timedelta) -> None:
    """Make ``timeout`` the default of every process group created from now on.

    deepspeed.init_distributed(timeout=...) reaches only the world group. DeepSpeed creates
    its data-parallel, pipeline and other groups with ``dist.new_group(ranks)``, which takes
    torch's default instead (measured: its data-parallel group had 30 minutes under a 5 s
    world timeout, and a training step waited 200 s on a stopped peer under a 60 s one).
    torch looks its default up in these module globals at each ``new_group`` call, and
    offers no public setter.
    """
    c10d = dist.distributed_c10d
    c10d.default_pg_timeout = timeout
    if getattr(c10d, "default_pg_nccl_timeout", None) is not None:
        c10d.default_pg_nccl_timeout = timeout
    try:
        applied = c10d._get_default_timeout(dist.Backend.GLOO) == timeout
    except AttributeError:
        applied = False
    if not applied:
        warnings.warn(
            f"torch {torch.__version__}: could not set the default timeout of new process "
            "groups; DeepSpeed's groups keep torch's (30 minutes on gloo)",
            stacklevel=3,
        )


# What a collective raises when a peer is gone or silent. gloo raises a plain RuntimeError
# whose message names its transport: "[.../gloo/transport/tcp/pair.cc:537] Read error
# [10.0.0.2]:4711: Connection reset by peer. This is typically caused by ..." for a dead
# peer, "[.../unbound_buffer.cc:78] Timed out waiting 1800000ms for recv operation to
# complete" for a silent one. NCCL and the store raise torch's DistError subclasses.
_GLOO_TRANSPORT = re.compile(r"^\[[^\]]*gloo/transport/[^\]]*\]\s*")
_NCCL_LOST = re.compile(r"remote process exited|network error|timed? ?out|aborted", re.IGNORECASE)


def lost_contact(error: BaseException) -> str | None:
    """A short reason if ``error`` (or an error it was raised from) is a collective or store
    operation that failed because another rank died or did not answer within the timeout;
    None for any other error."""
    current: BaseException | None = error
    seen = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        message = str(current).strip()
        first = message.splitlines()[0] if message else type(current).__name__
        if _GLOO_TRANSPORT.match(first):
            reason = _GLOO_TRANSPORT.sub("", first).split(". This is typically")[0]
            return reason.rstrip(". ")[:160]
        if isinstance(current, (dist.DistNetworkError, dist.DistStoreError)) or (
            isinstance(current, dist.DistBackendError) and _NCCL_LOST.search(message)
        ):
            return f"{type(current).__name__}: {first}"[:160]
        current = current.__cause__ or current.__context__
    return None


def _without_shm_all_reduce() -> None:
    """Keep DeepSpeed from building and starting its CPU shared-memory all-reduce.

    On CPU, DeepSpeed's communication backend JIT-compiles an op (about 90 s on a fresh
    machine) and, when all ranks share a host, gives each rank a 64 MiB workspace in
    /dev/shm, named ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, that it never
    unlinks: a few hundred runs filled a 24 GiB machine's RAM. It serves only
    ``inference_all_reduce``, which training never calls (ZeRO, the pipeline and our own
    collectives go through gloo). Unlinking the names once every rank had mapped them still
    left them behind when a rank was killed before that (found by the SIGKILL test), and
    the op's set-up waits for every rank without a timeout. Its
    builder is DeepSpeed's list of compatible ops; marked incompatible, the op is never
    built, and ``inference_all_reduce`` falls back to torch.distributed.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


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


def all_reduce_sum_(values: torch.Tensor, group=None) -> torch.Tensor:
    """Sum a tensor over ``group`` in place, where it lives (the device with NCCL, the CPU
    with gloo), leaving it there: nothing is read on the host."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, group=group)
    return values
