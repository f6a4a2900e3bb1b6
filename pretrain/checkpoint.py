"""Sharded DeepSpeed checkpoints with everything an exact resume needs.

Layout (DeepSpeed's own, plus two small files of ours per tag):

    RUN_DIR/checkpoints/
      latest                       the newest *complete* checkpoint's tag
      global_step000020/
        mp_rank_00_model_states.pt, *_optim_states.pt ...   DeepSpeed's shards
        run_state.json             step, consumed_samples, config, manifest hash (rank 0)
        rng/rank00000.pt ...       each rank's Python, NumPy and torch RNG states

``client_state`` carries the importance table, ``consumed_samples``, the resolved config
and the manifest hash. ``latest`` is written by us, atomically, only after every rank has
finished writing (DeepSpeed's own ``latest`` could name a checkpoint another rank is
still writing). ``run_state.json`` lets a resume check compatibility before DeepSpeed
touches any tensor, so a mismatch is a clear error instead of a shape error.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from data_prep.atomic import write_atomic
from pretrain.config import ConfigError
from pretrain.distributed import launcher_world_size

LATEST = "latest"


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


def find_checkpoint(resume: str | None, run_dir: str) -> CheckpointRef | None:
    """What ``--resume`` points at: None (fresh), ``auto`` or a PATH (a run directory, its
    checkpoints directory, or one tag directory). Raises ConfigError when PATH holds none,
    and when a fresh run would overwrite existing checkpoints."""
    own = os.path.join(run_dir, "checkpoints")
    if resume is None:
        if os.path.isfile(os.path.join(own, LATEST)):
            raise ConfigError(
                f"{run_dir} already holds checkpoints; pass --resume auto to continue, or "
                "choose a new --output"
            )
        return None
    if resume == "auto":
        return _latest(own)
    for directory in (os.path.join(resume, "checkpoints"), resume):
        ref = _latest(directory)
        if ref is not None:
            return ref
    if os.path.isfile(os.path.join(resume, "run_state.json")):
        path = os.path.abspath(resume.rstrip("/"))
        return CheckpointRef(os.path.dirname(path), os.path.basename(path))
    raise ConfigError(
        f"--resume {resume}: holds no checkpoint (no 'latest' file or run_state.json)"
    )


def _latest(directory: str) -> CheckpointRef | None:
    path = os.path.join(directory, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return CheckpointRef(os.path.abspath(directory), tag)


def check_compatible(state: dict, resolved: dict, where: str) -> None:
    """Refuse to resume onto other data, vocabulary, sequence length or model."""
    old, new = state["config"], resolved
    problems = []
    if old["data"]["manifest_sha256"] != new["data"]["manifest_sha256"]:
        problems.append(f"other data (manifest of {old['data']['dir']} vs {new['data']['dir']})")
    for key in ("vocab_size", "seq_len"):
        if old["data"][key] != new["data"][key]:
            problems.append(f"{key} {old['data'][key]} vs {new['data'][key]}")
    # regularisation and kernels change no weight: a resumed run may set them anew
    free = ("dropout", "attention_dropout", "kernels")
    old_model = {k: v for k, v in old["model"].items() if k not in free}
    new_model = {k: v for k, v in new["model"].items() if k not in free}
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
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: str, step: int, client_state: dict, run_state: dict) -> CheckpointRef:
    """Every rank calls this. Writes the DeepSpeed shards, our files, then ``latest``."""
    directory = os.path.join(run_dir, "checkpoints")
    ref = CheckpointRef(directory, tag_of(step))
    rank = dist.get_rank()
    os.makedirs(os.path.join(ref.path, "rng"), exist_ok=True)
    torch.save(rng_state(), os.path.join(ref.path, "rng", f"rank{rank:05d}.pt"))
    engine.save_checkpoint(directory, tag=ref.tag, client_state=client_state, save_latest=False)
    if rank == 0:
        write_atomic(
            os.path.join(ref.path, "run_state.json"), json.dumps(run_state, indent=2).encode()
        )
    dist.barrier()  # every rank's shards are on disk before `latest` names them
    if rank == 0:
        write_atomic(os.path.join(directory, LATEST), ref.tag.encode())
    dist.barrier()
    return ref


def load(engine, ref: CheckpointRef) -> dict:
    """Every rank calls this. Loads the DeepSpeed state; returns the client_state."""
    path, client_state = engine.load_checkpoint(ref.directory, tag=ref.tag)
    if path is None:
        raise ConfigError(f"{ref.path}: DeepSpeed could not load this checkpoint")
    rng = os.path.join(ref.path, "rng", f"rank{dist.get_rank():05d}.pt")
    if os.path.isfile(rng):
        set_rng_state(torch.load(rng, weights_only=False))
    return client_state
