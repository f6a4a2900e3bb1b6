#!/usr/bin/env bash
# Install the system packages that the real-cluster tests need on Debian 12:
# Open MPI (mpirun, and the library mpi4py loads) and a one-node SLURM
# (munge, slurmctld, slurmd, sbatch/srun/squeue/scontrol).
#
# Idempotent: installs only what is missing. Run as root (CI and the dev
# machines are root). Starts no service: the tests start their own private
# munged/slurmctld/slurmd under a temporary directory (tests/cluster.py), so
# daemons started by the packages' maintainer scripts would only get in the way.
set -euo pipefail

PACKAGES=(
    openmpi-bin    # mpirun, orted
    libopenmpi-dev # libmpi.so that mpi4py loads at run time
    munge          # munged, mungekey: SLURM's authentication
    slurmctld      # controller daemon
    slurmd         # compute-node daemon (ships slurmstepd)
    slurm-client   # sbatch, srun, squeue, scontrol, sinfo, scancel
)

if [[ $(id -u) -ne 0 ]]; then
    echo "install_system_deps.sh: must run as root (apt-get install)" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [[ $status != installed ]]; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install_system_deps.sh: all present: ${PACKAGES[*]}"
    exit 0
fi

echo "install_system_deps.sh: installing ${missing[*]}"

# Keep the maintainer scripts from starting munge/slurmctld/slurmd: a
# policy-rc.d that answers 101 ("action forbidden") is honoured by both
# invoke-rc.d and deb-systemd-invoke. Leave an existing one alone (containers
# often ship one) and remove ours afterwards.
POLICY=/usr/sbin/policy-rc.d
own_policy=0
if [[ ! -e $POLICY ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$POLICY"
    chmod 755 "$POLICY"
    own_policy=1
fi
cleanup() {
    if [[ $own_policy -eq 1 ]]; then
        rm -f "$POLICY"
    fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -q -o DPkg::Lock::Timeout=300
apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 "${missing[@]}"

# On a host booted with systemd, the packages also enable their units for the
# next boot; undo that for the units this run installed, so nothing starts
# later behind the tests' back. (Packages that were already there keep
# whatever the admin chose.)
if [[ -d /run/systemd/system ]]; then
    for pkg in "${missing[@]}"; do
        case $pkg in
            munge | slurmctld | slurmd)
                systemctl disable --now "$pkg" >/dev/null 2>&1 || true
                ;;
        esac
    done
fi

echo "install_system_deps.sh: done"
