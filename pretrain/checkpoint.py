"""Sharded DeepSpeed checkpoints with everything an exact resume needs.

Layout (DeepSpeed's own, plus two small files of ours per tag):

    RUN_DIR/checkpoints/
      latest                       the newest *complete* checkpoint's tag
      global_step000020/
        mp_rank_00_model_states.pt, *_optim_states.pt ...   DeepSpeed's shards
        run_state.json             step, consumed_samples, config, manifest hash (rank 0)
        rng/rank00000.pt ...       each rank's Python, NumPy and torch RNG states
        files.json                 every other file's size and sha256, written before
                                   ``latest`` names the checkpoint

``client_state`` carries the importance table, ``consumed_samples``, the resolved config
and the manifest hash. ``latest`` is written by us, atomically, only after every rank has
finished writing (DeepSpeed's own ``latest`` could name a checkpoint another rank is
still writing). ``run_state.json`` lets a resume check compatibility before DeepSpeed
touches any tensor, so a mismatch is a clear error instead of a shape error.

A checkpoint proves itself: before one is loaded (``--resume``, export), its files are
checked against ``files.json``. ``--resume auto`` falls back from a ``latest`` that fails
to the newest checkpoint that verifies; ``--resume PATH`` to one that fails is an error
naming the file. A checkpoint written before ``files.json`` existed loads unverified.

Before anything is written, every rank checks that the checkpoint can be (a probe file,
the free space against the previous checkpoint's size or an estimate); otherwise all
ranks raise :class:`CheckpointWriteError` together and ``latest`` stays as it was.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from data_prep.atomic import TMP_MARK, write_atomic
from data_prep.manifest import file_sha256
from pretrain.config import FREE_MODEL_FIELDS, ConfigError
from pretrain.distributed import launcher_world_size

LATEST = "latest"
FILES = "files.json"
_TAG = re.compile(r"global_step(\d+)")


def tag_of(step: int) -> str:
    return f"global_step{step:06d}"


@dataclass
class CheckpointRef:
    directory: str  # the checkpoints directory (holds the tags)
    tag: str

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.tag)

    def run_state(self) -> dict:
        path = os.path.join(self.path, "run_state.json")
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            raise ConfigError(
                f"{self.path}: not a checkpoint of this project (no run_state.json)"
            ) from None


def find_checkpoint(
    resume: str | None, run_dir: str, say: Callable[[str], None] | None = None
) -> CheckpointRef | None:
    """What ``--resume`` points at: None (fresh), ``auto`` or a PATH (a run directory, its
    checkpoints directory, or one tag directory), verified (:func:`verify`). Raises
    ConfigError when PATH holds none or fails verification, and when a fresh run would
    overwrite existing checkpoints. ``auto`` falls back from a ``latest`` that fails to the
    newest checkpoint that verifies, and tells ``say`` why."""
    own = os.path.join(run_dir, "checkpoints")
    if resume is None:
        if os.path.isfile(os.path.join(own, LATEST)):
            raise ConfigError(
                f"{run_dir} already holds checkpoints; pass --resume auto to continue, or "
                "choose a new --output"
            )
        return None
    if resume == "auto":
        return _newest_verified(own, say or (lambda text: None))
    for directory in (os.path.join(resume, "checkpoints"), resume):
        ref = find_latest(directory)
        if ref is not None:
            verify(ref)
            return ref
    if os.path.isfile(os.path.join(resume, "run_state.json")):
        path = os.path.abspath(resume.rstrip("/"))
        ref = CheckpointRef(os.path.dirname(path), os.path.basename(path))
        verify(ref)
        return ref
    raise ConfigError(
        f"--resume {resume}: holds no checkpoint (no 'latest' file or run_state.json)"
    )


def _newest_verified(directory: str, say: Callable[[str], None]) -> CheckpointRef | None:
    """``latest``, or when it fails verification the newest checkpoint that verifies."""
    latest = find_latest(directory)
    if latest is None:
        return None
    candidates = [latest] + [
        ref for _, ref in reversed(complete_checkpoints(directory)) if ref.tag != latest.tag
    ]
    failures = []
    for ref in candidates:
        try:
            verify(ref)
        except ConfigError as e:
            failures.append(str(e))
            continue
        if failures:
            say(f"run.py: {failures[0]}; resuming from {ref.tag}, the newest that verifies")
        return ref
    raise ConfigError(f"no checkpoint in {directory} verifies ({failures[0]})")


def complete_checkpoints(directory: str, marker: str = FILES) -> list[tuple[int, CheckpointRef]]:
    """(step, checkpoint) of the tags in ``directory`` that hold ``marker`` (``files.json``:
    their save finished; ``run_state.json``: rank 0's files are written), oldest first;
    universal copies left out."""
    found = []
    for tag in os.listdir(directory) if os.path.isdir(directory) else []:
        match = _TAG.fullmatch(tag)
        if match and os.path.isfile(os.path.join(directory, tag, marker)):
            found.append((int(match[1]), CheckpointRef(os.path.abspath(directory), tag)))
    return sorted(found, key=lambda item: item[0])


def _digest(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def _files_of(ref: CheckpointRef) -> list[str]:
    """The checkpoint's files, relative to its directory, sorted; files.json left out."""
    names = []
    for root, _, files in os.walk(ref.path):
        names += [os.path.relpath(os.path.join(root, f), ref.path) for f in files]
    # a temporary file a kill left (write_atomic's, the preflight's probe) is not the
    # checkpoint's
    return sorted(n for n in names if n != FILES and TMP_MARK not in n)


def verify(ref: CheckpointRef) -> None:
    """Check every file ``files.json`` records: present, of its size and its sha256. Raises
    ConfigError naming the first that fails. Without ``files.json`` (a checkpoint from
    before checksums were recorded) there is nothing to check."""
    record = os.path.join(ref.path, FILES)
    if not os.path.isfile(record):
        return
    try:
        with open(record) as f:
            files = json.load(f)["files"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ConfigError(f"checkpoint {ref.path}: unreadable {FILES} ({e})") from None
    for name, expected in files.items():
        path = os.path.join(ref.path, name)
        if not os.path.isfile(path):
            problem = "is missing"
        elif os.path.getsize(path) != expected["bytes"]:
            problem = f"has {os.path.getsize(path):,} bytes, {expected['bytes']:,} were written"
        elif _digest(path)["sha256"] != expected["sha256"]:
            problem = "differs from what was written (sha256)"
        else:
            continue
        raise ConfigError(f"checkpoint {ref.path} is corrupt: {name} {problem}")


def _record_files(ref: CheckpointRef) -> None:
    """Every rank, once all have written: each hashes a share of the files, rank 0 writes
    ``files.json`` (atomically)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    names = [_files_of(ref) if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)  # one listing: every rank hashes its share
    mine = {n: _digest(os.path.join(ref.path, n)) for n in names[0][rank::world]}
    shares: list[dict | None] = [None] * world
    dist.all_gather_object(shares, mine)
    if rank == 0:
        files = {n: d for share in shares for n, d in share.items()}
        text = json.dumps({"files": dict(sorted(files.items()))}, indent=1)
        write_atomic(os.path.join(ref.path, FILES), text.encode())


def _prune(directory: str, step: int, keep: int) -> None:
    """Keep the checkpoint of ``step`` (complete: ``latest`` names it) and the newest
    ``keep - 1`` complete ones before it; delete every other checkpoint before ``step``,
    complete or not (a save or a deletion that a kill cut short). Checkpoints after
    ``step`` (left by a run that fell back to an older one) are not touched."""
    complete = [ref.tag for s, ref in complete_checkpoints(directory) if s < step]
    kept = set(complete[len(complete) - min(keep - 1, len(complete)) :])
    for name in os.listdir(directory):
        match = _TAG.fullmatch(name)
        if match and int(match[1]) < step and name not in kept:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def find_latest(directory: str) -> CheckpointRef | None:
    """The checkpoint ``latest`` names in a checkpoints directory (unverified), or None."""
    path = os.path.join(directory, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return CheckpointRef(os.path.abspath(directory), tag)


# the data order of checkpoints that do not record one: a materialised permutation per epoch
MATERIALISED_ORDER = "pcg64-permutation"


def check_compatible(state: dict, resolved: dict, where: str) -> None:
    """Refuse to resume onto other data, vocabulary, sequence length, model or data order."""
    from pretrain.data import SampleOrder

    old, new = state["config"], resolved
    problems = []
    order = state.get("data_order", MATERIALISED_ORDER)
    if order != SampleOrder.ALGORITHM:
        problems.append(
            f"its data order is {order}, this version's is {SampleOrder.ALGORITHM} (the run "
            "would see other batches; finish it with the version that started it, or start "
            "a new run)"
        )
    if old["data"]["manifest_sha256"] != new["data"]["manifest_sha256"]:
        problems.append(f"other data (manifest of {old['data']['dir']} vs {new['data']['dir']})")
    for key in ("vocab_size", "seq_len"):
        if old["data"][key] != new["data"][key]:
            problems.append(f"{key} {old['data'][key]} vs {new['data'][key]}")
    # regularisation and kernels change no weight: a resumed run may set them anew
    old_model = {k: v for k, v in old["model"].items() if k not in FREE_MODEL_FIELDS}
    new_model = {k: v for k, v in new["model"].items() if k not in FREE_MODEL_FIELDS}
    if old_model != new_model:
        diff = [k for k in new_model if old_model.get(k) != new_model[k]]
        problems.append(
            "another model ("
            + ", ".join(f"{k} {old_model.get(k)} vs {new_model[k]}" for k in diff)
            + ")"
        )
    for key in ("token_drop", "pipeline_stages"):
        if old["run"][key] != new["run"][key]:
            problems.append(f"--{key.replace('_', '-')} {old['run'][key]} vs {new['run'][key]}")
    if problems:
        raise ConfigError(f"cannot resume from {where}: " + "; ".join(problems))


def prepare_resume(state: dict, deepspeed_config: dict, where: str) -> None:
    """Refuse a checkpoint of another data-parallel world size unless it is universal;
    for a universal one, tell DeepSpeed to load it as such."""
    if state.get("universal"):
        deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True
        return
    world = launcher_world_size()
    zero_stage = (deepspeed_config.get("zero_optimization") or {}).get("stage", 0)
    if state["world_size"] != world and zero_stage > 0:
        raise ConfigError(
            f"{where} was written by {state['world_size']} ranks, this run has {world}: ZeRO "
            f"stage {zero_stage} cannot re-partition it; convert it with `python -m "
            f"pretrain.universal {where}` and resume from the converted checkpoint"
        )


def rng_state() -> dict:
    """This process's Python, NumPy and torch RNG states as tensors and plain values, so
    that ``torch.load(weights_only=True)`` reads them back without unpickling objects."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {
            "version": version,
            "state": torch.tensor(mt, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached_gaussian": cached,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rng_file(path: str) -> dict:
    """A rank's RNG file, read with ``weights_only=True``: tensors and plain values only."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(
            f"{path}: not an RNG state of this version (it holds objects: {e}); a checkpoint "
            "written before RNG states were stored as tensors cannot be resumed exactly"
        ) from None


class CheckpointWriteError(Exception):
    """A checkpoint cannot be written here (no space, read-only, no permission). Raised on
    every rank together, before anything of the checkpoint is written."""


def _size_of_newest(directory: str) -> int | None:
    """Bytes of the newest complete checkpoint, from its ``files.json``; None if none."""
    for _, ref in reversed(complete_checkpoints(directory)):
        try:
            with open(os.path.join(ref.path, FILES)) as f:
                return sum(d["bytes"] for d in json.load(f)["files"].values())
        except (OSError, json.JSONDecodeError, KeyError):
            continue
    return None


def _megabytes(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _preflight(ref: CheckpointRef, estimate: int) -> None:
    """Every rank: can this checkpoint be written? Each rank creates the tag directory,
    writes and removes a probe file and compares the free space with the checkpoint's
    size (the previous checkpoint's, else ``estimate``); the answers are gathered, so
    every rank raises :class:`CheckpointWriteError` together, naming where and how much,
    with nothing of the checkpoint left behind. A disk that fills during the write itself
    is :func:`_write_failed`'s case."""
    rank, world = dist.get_rank(), dist.get_world_size()
    existed = os.path.isdir(ref.path)
    dist.barrier()  # before any rank creates it
    previous = _size_of_newest(ref.directory)
    if previous:
        needed, basis = previous, "the size of the previous one"
    else:
        needed, basis = estimate, "estimated from the model and optimizer"
    problem = None
    try:
        os.makedirs(os.path.join(ref.path, "rng"), exist_ok=True)
        probe = os.path.join(ref.path, "rng", f"probe{TMP_MARK}{rank:05d}")
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
        os.remove(probe)
        free = shutil.disk_usage(ref.directory).free
        if free < needed:
            problem = (
                f"{ref.directory} has {_megabytes(free)} free, the checkpoint needs about "
                f"{_megabytes(needed)} ({basis})"
            )
    except OSError as e:
        problem = f"cannot write in {e.filename or ref.path}: {e.strerror}"
    problems: list[str | None] = [None] * world
    dist.all_gather_object(problems, problem)
    failed = [(r, p) for r, p in enumerate(problems) if p]
    if not failed:
        return
    dist.barrier()  # every rank is done with the directory before it goes
    if rank == 0 and not existed:
        shutil.rmtree(ref.path, ignore_errors=True)
    latest = find_latest(ref.directory)
    where, first = failed[0]
    seen = f" (seen by rank {where})" if world > 1 else ""
    raise CheckpointWriteError(
        f"{ref.tag} not written: {first}{seen}; latest still names "
        f"{latest.tag if latest else 'no checkpoint'}"
    )


def _write_failed(ref: CheckpointRef, error: OSError, estimate: int) -> None:
    """A write failed after the preflight passed (the disk filled meanwhile). The other
    ranks may be inside DeepSpeed's save, waiting in a barrier this rank will never reach,
    so no agreement is possible: say what happened in one line and end this process; the
    others then fail in their next collective (see :mod:`pretrain.distributed`) and the
    job ends. ``latest`` was not touched."""
    try:
        free = _megabytes(shutil.disk_usage(ref.directory).free)
    except OSError:
        free = "unknown"
    latest = find_latest(ref.directory)
    print(
        f"run.py: error: rank {dist.get_rank()} could not write checkpoint {ref.tag}: "
        f"{error.strerror} ({error.filename or ref.path}; {free} free, the checkpoint needs "
        f"about {_megabytes(estimate)}); latest still names "
        f"{latest.tag if latest else 'no checkpoint'}",
        file=sys.stderr,
        flush=True,
    )
    os._exit(4)


def save(
    engine,
    run_dir: str,
    step: int,
    client_state: dict,
    run_state: dict,
    keep: int = 0,
    estimate: int = 0,
) -> CheckpointRef:
    """Every rank calls this. Checks that the checkpoint can be written (raises
    :class:`CheckpointWriteError` on every rank if not; ``estimate``: its bytes when there
    is no previous checkpoint to go by), writes the DeepSpeed shards, our files,
    ``files.json``, then ``latest``; then deletes all but the newest ``keep`` checkpoints
    (0: keeps all)."""
    directory = os.path.join(run_dir, "checkpoints")
    ref = CheckpointRef(directory, tag_of(step))
    rank = dist.get_rank()
    _preflight(ref, estimate)
    try:
        torch.save(rng_state(), os.path.join(ref.path, "rng", f"rank{rank:05d}.pt"))
        engine.save_checkpoint(directory, tag=ref.tag, client_state=client_state, save_latest=False)
        if rank == 0:
            write_atomic(
                os.path.join(ref.path, "run_state.json"), json.dumps(run_state, indent=2).encode()
            )
        dist.barrier()  # every rank's shards are on disk before they are hashed
        _record_files(ref)
        if rank == 0:
            write_atomic(os.path.join(directory, LATEST), ref.tag.encode())
    except OSError as e:
        _write_failed(ref, e, _size_of_newest(directory) or estimate)
    if rank == 0 and keep:
        _prune(directory, step, keep)
    dist.barrier()
    return ref


def load(engine, ref: CheckpointRef) -> dict:
    """Every rank calls this. Loads the DeepSpeed state; returns the client_state."""
    path, client_state = engine.load_checkpoint(ref.directory, tag=ref.tag)
    if path is None:
        raise ConfigError(f"{ref.path}: DeepSpeed could not load this checkpoint")
    rng = os.path.join(ref.path, "rng", f"rank{dist.get_rank():05d}.pt")
    if os.path.isfile(rng):
        set_rng_state(load_rng_file(rng))
    return client_state
