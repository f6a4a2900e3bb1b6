"""A private one-node SLURM cluster for tests, started from Debian's packages.

Everything lives under one directory (a pytest tmp dir): the munge key and
socket, ``slurm.conf``, the controller's state, the node's spool, logs and pid
files. The daemons listen on ports picked free at start-up, so two test
sessions on one machine, or a system SLURM/munge, do not get in each other's
way. Client commands find this cluster through ``SLURM_CONF`` in
:attr:`SlurmCluster.env`; the cluster's ``AuthInfo`` points them at its munged.

Usage (no pytest needed)::

    with SlurmCluster(tmp_dir) as cluster:
        job_id = cluster.submit(script, options=["--ntasks=2"])
        assert cluster.wait(job_id, timeout=60) == "COMPLETED"

Needs root (``SlurmUser=root``, jobs run as the submitting user) and the
binaries that ``.ci/install_system_deps.sh`` installs; :func:`missing_binaries`
says which are absent. :class:`MpiLauncher` is the matching helper for Open
MPI's ``mpirun`` on this machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

SLURM_BINARIES = (
    "munged",
    "slurmctld",
    "slurmd",
    "slurmstepd",
    "sbatch",
    "srun",
    "squeue",
    "sinfo",
    "scontrol",
    "scancel",
)
MPI_BINARIES = ("mpirun",)

# States after which a job record no longer changes on its own. REQUEUED and
# PENDING are not here: a requeued job runs again.
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
    }
)

# Daemons live in sbin, which a non-login root shell does not always have on PATH.
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin"]
)


def find_binary(name: str) -> str | None:
    """Absolute path of ``name`` on PATH or in the sbin folders, or None."""
    return shutil.which(name, path=_SEARCH_PATH)


def missing_binaries(names: Iterable[str] = SLURM_BINARIES) -> list[str]:
    """The names in ``names`` that cannot be found; empty when all are installed."""
    return [name for name in names if find_binary(name) is None]


class ClusterError(RuntimeError):
    """The cluster could not start, or a client command against it failed."""


def _free_port() -> int:
    # Bind on all addresses, as slurmctld and slurmd do, then hand the port over.
    # The window between close() and the daemon's bind() is tiny.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _clean_environ() -> dict[str, str]:
    """This process's environment without variables that would tie client
    commands to another SLURM (e.g. when the tests themselves run in a job)."""
    prefixes = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCONTROL_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


class SlurmCluster:
    """munged + slurmctld + slurmd for one node (this host), rooted at ``root``.

    ``kill_wait`` is slurm.conf's KillWait: seconds between SIGTERM and SIGKILL
    when a job is cancelled, requeued or times out. ``cred_expire`` (AuthInfo)
    also sets how long a requeued job waits before it may start again (Slurm's
    default of 120 s would dominate a requeue test).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        cpus: int | None = None,
        kill_wait: int = 30,
        cred_expire: int = 10,
        cluster_name: str = "tdbtest",
    ) -> None:
        self.root = Path(root).resolve()
        self.node_name = socket.gethostname().split(".")[0]
        # At least two so that two-rank jobs fit anywhere; config_overrides lets
        # slurmd accept more CPUs than the machine has.
        self.cpus = cpus or max(2, os.cpu_count() or 1)
        self.kill_wait = kill_wait
        self.cred_expire = cred_expire
        self.cluster_name = cluster_name
        self.conf_path = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.log_dir = self.root / "log"
        self.env: dict[str, str] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- lifecycle ---------------------------------------------------------

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        """Start munged, slurmctld and slurmd; return once the node is idle.

        Raises ClusterError with the daemons' log tails when something is
        missing or the node does not come up within ``timeout`` seconds; in
        that case everything already started is stopped again.
        """
        missing = missing_binaries()
        if missing:
            raise ClusterError(
                f"SLURM/munge binaries not found: {', '.join(missing)}; "
                "run `bash .ci/install_system_deps.sh` as root"
            )
        if os.geteuid() != 0:
            raise ClusterError("the test cluster runs its daemons as root (SlurmUser=root)")
        for sub in ("etc", "munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to 108 bytes (slurmd's spool sockets too).
        if len(str(self.munge_socket)) > 90:
            raise ClusterError(f"cluster root {self.root} is too long for Unix sockets")
        self.env = _clean_environ()
        self.env["SLURM_CONF"] = str(self.conf_path)
        try:
            self._start_munged()
            self.conf_path.write_text(self._slurm_conf())
            self._spawn("slurmctld", ["-D", "-c", "-f", str(self.conf_path)])
            self._spawn("slurmd", ["-D", "-c", "-f", str(self.conf_path)])
            self._wait_until_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons and munged, and kill anything the
        cluster started that is still alive. Safe to call more than once."""
        if self._alive("slurmctld"):
            self._cancel_all_jobs(timeout=self.kill_wait + 15)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.get(name)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self._procs.clear()
        self._kill_leftovers()

    def __enter__(self) -> SlurmCluster:
        if not self._procs:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- jobs --------------------------------------------------------------

    def run(
        self, args: Sequence[str], *, check: bool = True, timeout: float = 30.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a client command (``["squeue", ...]``) against this cluster; extra
        keyword arguments go to subprocess.run. Raises ClusterError if it fails
        and ``check``."""
        argv = [find_binary(args[0]) or args[0], *args[1:]]
        result = subprocess.run(
            argv,
            env=kwargs.pop("env", self.env),
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )
        if check and result.returncode != 0:
            raise ClusterError(
                f"`{' '.join(args)}` exited {result.returncode}:\n{result.stderr.strip()}"
            )
        return result

    def submit(
        self,
        script: str | os.PathLike[str],
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        options: Sequence[str] = (),
        cwd: str | os.PathLike[str] | None = None,
    ) -> int:
        """``sbatch [options] script [args]``; returns the job id.

        ``env`` adds to the environment that sbatch passes on to the job.
        ``cwd`` (default: the script's folder) is where sbatch runs, hence the
        job's working directory and where ``slurm-<id>.out`` lands.
        """
        script = Path(script).resolve()
        job_env = {**self.env, **(env or {})}
        result = self.run(
            ["sbatch", "--parsable", *options, str(script), *args],
            env=job_env,
            cwd=str(cwd or script.parent),
        )
        return int(result.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """The fields of ``scontrol show job -o JOB_ID`` (JobState, Restarts,
        StdOut, ExitCode, Reason, ...). Raises ClusterError for unknown jobs."""
        result = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        line = result.stdout.strip().splitlines()[0]
        # Keys hold neither spaces nor "="; values may hold "=" (TRES=cpu=2,...)
        # and, rarely, spaces, so a value runs up to the next " Key=".
        pairs = re.findall(r"(\S+?)=(.*?)(?=\s+\S+?=|$)", line)
        return dict(pairs)

    def state(self, job_id: int) -> str:
        """The job's state as scontrol reports it: ``PENDING``, ``RUNNING``,
        ``COMPLETING`` (also between a requeue and the next run), ``COMPLETED``..."""
        return self.job_info(job_id)["JobState"]

    def wait(
        self,
        job_id: int,
        timeout: float = 120.0,
        states: Iterable[str] = TERMINAL_STATES,
        poll: float = 0.5,
    ) -> str:
        """Poll until the job reaches one of ``states``; return that state.

        On timeout raises TimeoutError with the job record, the end of its
        output and the daemons' logs.
        """
        wanted = frozenset(states)
        deadline = time.monotonic() + timeout
        while True:
            current = self.state(job_id)
            if current in wanted:
                return current
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {current} after {timeout:.0f}s\n" + self.describe(job_id)
                )
            time.sleep(poll)

    def signal(self, job_id: int, signame: str, *, batch_only: bool = True) -> None:
        """Send ``signame`` (e.g. "USR1") to the job's batch shell (``batch_only``)
        or to all its steps: what ``--signal=B:USR1@<secs>`` does near the time
        limit, but now. (slurmctld checks that option only about once a minute
        against limits of whole minutes, too slow and coarse for tests.)"""
        scope = ["--batch"] if batch_only else []
        self.run(["scancel", f"--signal={signame}", *scope, str(job_id)])

    def describe(self, job_id: int) -> str:
        """Job record, output tail and daemon logs, for assertion messages."""
        parts = []
        try:
            info = self.job_info(job_id)
            parts.append(" ".join(f"{k}={v}" for k, v in info.items()))
            stdout = info.get("StdOut")
            if stdout:
                parts.append(f"--- {stdout} (tail)\n{_tail(Path(stdout), 30)}")
        except ClusterError as exc:
            parts.append(str(exc))
        parts.append(self.logs())
        return "\n".join(parts)

    def logs(self, lines: int = 40) -> str:
        """The last ``lines`` of each daemon's log files."""
        files = sorted(self.log_dir.glob("*.log"))
        return "\n".join(f"--- {f.name} (tail)\n{_tail(f, lines)}" for f in files)

    # -- internals -----------------------------------------------------------

    def _slurm_conf(self) -> str:
        root = self.root
        ctld_port, node_port = _free_port(), _free_port()
        memory = max(256, int(_memory_mb() * 0.9))
        return f"""\
# Written by tests/cluster.py for a throw-away one-node cluster.
ClusterName={self.cluster_name}
SlurmctldHost={self.node_name}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}

StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "run" / "slurmctld.pid"}
SlurmdPidFile={root / "run" / "slurmd.pid"}
SlurmctldLogFile={self.log_dir / "slurmctld.log"}
SlurmdLogFile={self.log_dir / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups: works in containers and without systemd.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true

SchedulerType=sched/backfill
# Look at pending jobs every second, so a requeued job restarts promptly.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Keep finished jobs visible to `scontrol show job` (there is no slurmdbd).
MinJobAge=300
JobRequeue=1
KillWait={self.kill_wait}
InactiveLimit=0
Waittime=0

# Trust slurm.conf over what slurmd detects (containers, CPUs={self.cpus}).
SlurmdParameters=config_overrides
NodeName={self.node_name} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={self.node_name} Default=YES MaxTime=INFINITE State=UP
"""

    def _start_munged(self) -> None:
        munge_dir = self.root / "munge"
        key = munge_dir / "munge.key"
        if not key.exists():
            # munged wants a private key file of at least 32 bytes.
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(os.urandom(1024))
        self._spawn(
            "munged",
            [
                "--foreground",
                "--force",  # tolerate a group-writable ancestor of the tmp dir
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
        )
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if not self._alive("munged") or time.monotonic() > deadline:
                raise ClusterError("munged did not come up\n" + self.logs())
            time.sleep(0.05)

    def _spawn(self, name: str, args: list[str]) -> None:
        binary = find_binary(name)
        assert binary is not None, name  # checked in start()
        # The daemons' own stdout/stderr: errors from before their log file is
        # open, and all of munged's log (it logs to stderr in the foreground).
        with open(self.log_dir / f"{name}.stderr.log", "ab") as out:
            # A new session keeps a Ctrl-C at the terminal from killing the
            # daemons before stop() has cancelled the jobs.
            self._procs[name] = subprocess.Popen(
                [binary, *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
            )

    def _alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def _wait_until_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name in ("munged", "slurmctld", "slurmd"):
                if not self._alive(name):
                    code = self._procs[name].returncode
                    raise ClusterError(f"{name} exited with {code} at start-up\n" + self.logs())
            result = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=10)
            last = (result.stdout + result.stderr).strip()
            if result.returncode == 0 and last == f"{self.node_name} idle":
                return
            time.sleep(0.25)
        raise ClusterError(
            f"node {self.node_name} not idle after {timeout:.0f}s (sinfo: {last!r})\n" + self.logs()
        )

    def _cancel_all_jobs(self, timeout: float) -> None:
        try:
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.split()
            if not jobs:
                return
            self.run(["scancel", *jobs], check=False, timeout=10)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                result = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
                if result.returncode == 0 and not result.stdout.strip():
                    return
                time.sleep(0.5)
        except subprocess.TimeoutExpired:
            pass  # a hung controller is killed next; leftovers are reaped after

    def _kill_leftovers(self) -> None:
        """SIGKILL processes started by this cluster that outlived the daemons
        (slurmstepd and job processes detach from slurmd). They are recognised
        by our SLURM_CONF in their environment, which all of them inherit."""
        marker = f"SLURM_CONF={self.conf_path}".encode()
        me = os.getpid()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)


# -- Open MPI ------------------------------------------------------------------


class MpiLauncher:
    """Base ``mpirun`` command for this machine: ``launcher(2) + [python, script]``,
    run with ``env=launcher.env``.

    Adds ``--allow-run-as-root`` when root, and ``--oversubscribe`` so tests can
    start more ranks than there are cores (2 on CI). ``env`` is this process's
    environment without SLURM variables (mpirun would otherwise launch through
    an enclosing allocation) plus, as root, Open MPI's own consent variables,
    which tools that wrap mpirun also honour.
    """

    def __init__(self) -> None:
        mpirun = find_binary("mpirun")
        if mpirun is None:
            raise ClusterError("mpirun not found; run `bash .ci/install_system_deps.sh` as root")
        # --noprefix: called by its absolute path, mpirun would put /usr/bin first on the
        # ranks' PATH (Debian's ninja instead of pip's, which rebuilds DeepSpeed's op)
        self.base = [mpirun, "--oversubscribe", "--noprefix"]
        self.env = _clean_environ()
        if os.geteuid() == 0:
            self.base.insert(1, "--allow-run-as-root")
            self.env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
            self.env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"

    def __call__(self, num_procs: int) -> list[str]:
        return [*self.base, "-np", str(num_procs)]
