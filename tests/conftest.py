"""Shared pytest fixtures.

Real-cluster fixtures (``slurm_cluster``, ``mpirun_cmd``) need the system
packages from ``.ci/install_system_deps.sh``. Without them the tests that use
these fixtures are skipped, except under CI (``CI=true``) or with
``REQUIRE_CLUSTER_TESTS=1``, where they fail: CI must not skip silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from cluster import MPI_BINARIES, SLURM_BINARIES, MpiLauncher, SlurmCluster, missing_binaries
from corpus import make_data

# -- data ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small DATA_DIR (seq_len 64, vocabulary 200) shared by the training tests."""
    return make_data(tmp_path_factory.mktemp("train_data") / "data", seed=21)


# -- real SLURM and Open MPI -------------------------------------------------


def cluster_tests_required() -> bool:
    """True where a missing cluster dependency must fail rather than skip."""
    return os.environ.get("CI") == "true" or os.environ.get("REQUIRE_CLUSTER_TESTS") == "1"


def require_system_tools(what: str, binaries: tuple[str, ...], needs_root: bool) -> None:
    """Skip (or, under CI, fail) when ``binaries`` are missing or root is needed."""
    problems = []
    missing = missing_binaries(binaries)
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if needs_root and os.geteuid() != 0:
        problems.append("needs root")
    if not problems:
        return
    message = (
        f"{what} unavailable ({'; '.join(problems)}): run `sudo bash .ci/install_system_deps.sh`"
    )
    if cluster_tests_required():
        pytest.fail(message + " (CI=true or REQUIRE_CLUSTER_TESTS=1: not skipping)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A one-node SLURM cluster (munged, slurmctld, slurmd) shared by the session.

    Submit with ``slurm_cluster.submit(script, options=[...])``, wait with
    ``slurm_cluster.wait(job_id)``; run client commands yourself with
    ``env=slurm_cluster.env``. Jobs left running are cancelled at the end.
    """
    require_system_tools("SLURM", SLURM_BINARIES, needs_root=True)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def mpirun_cmd() -> MpiLauncher:
    """Open MPI launcher: ``subprocess.run([*mpirun_cmd(2), sys.executable, script],
    env=mpirun_cmd.env)`` (``mpirun [--allow-run-as-root] --oversubscribe -np 2``)."""
    require_system_tools("Open MPI", MPI_BINARIES, needs_root=False)
    return MpiLauncher()
