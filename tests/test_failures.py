"""Runs that cannot go on end with one line and a good ``latest``: a diverging loss, a full
disk, a read-only checkpoint directory. Real DeepSpeed runs; the disks are real tmpfs and
bind mounts (root, as in CI)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess

import pytest
import torch
from conftest import require_system_tools
from test_train import REPO, at_once, deepspeed, metrics, single, train_args


def ds_config(tmp_path, name: str, max_lr: float) -> str:
    """cpu_zero2.json with a constant learning rate after 5 warm-up steps."""
    with open(os.path.join(REPO, "ds_configs", "cpu_zero2.json")) as f:
        config = json.load(f)
    config["scheduler"] = {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.0, "warmup_max_lr": max_lr, "warmup_num_steps": 5},
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


def latest_tag(run_dir) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def tags(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("global_step*"))


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("run.py: error: ")]


def checkpoint_is_finite(run_dir, tag: str) -> bool:
    path = run_dir / "checkpoints" / tag
    state = torch.load(path / "mp_rank_00_model_states.pt", weights_only=False)
    tensors = [state["importance"]["table"], *state["module"].values()]
    for optim in path.glob("*optim_states.pt"):
        flat = torch.load(optim, weights_only=False)["optimizer_state_dict"]
        tensors += flat["single_partition_of_fp32_groups"]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.slow
def test_a_diverging_run_stops_after_max_bad_steps_and_keeps_the_last_good_checkpoint(
    data_dir, tmp_path
):
    """Six good steps, then the learning rate is raised to 1e30 (a resume with another
    DeepSpeed JSON): the loss goes non-finite, the run stops after --max-bad-steps 3 such
    steps with one line naming the step, and no checkpoint after the last finite step
    exists, although one was due every step."""
    out = tmp_path / "run"
    good = ds_config(tmp_path, "good", 1e-3)
    deepspeed(train_args(data_dir, out, good, 30, "--stop-at-step", 6, "--save-every", 3))
    assert latest_tag(out) == "global_step000006"

    bad = ds_config(tmp_path, "bad", 1e30)
    args = train_args(data_dir, out, bad, 30, "--save-every", 1, "--resume", "auto")
    result = deepspeed([*args, "--max-bad-steps", "3"], check=False)
    assert result.returncode == 3, result.stderr[-3000:]

    steps = [r for r in metrics(out) if "loss" in r]
    bad_steps = [r["step"] for r in steps if r.get("non_finite")]
    assert bad_steps and bad_steps == list(range(bad_steps[0], bad_steps[0] + 3)), steps
    assert all(math.isfinite(r["loss"]) for r in steps if r["step"] < bad_steps[0])
    assert not math.isfinite(steps[-1]["loss"]) and steps[-1]["step"] == bad_steps[-1]
    last_good = f"global_step{bad_steps[0] - 1:06d}"

    (line,) = errors(result)
    assert f"step {bad_steps[-1]}: loss nan" in line, line
    assert "3 consecutive steps not finite (--max-bad-steps 3)" in line
    assert f"latest still names {last_good}" in line
    assert latest_tag(out) == last_good
    assert tags(out)[-1] == last_good, "a checkpoint after a non-finite step was written"
    refused = [line for line in result.stderr.splitlines() if "not checkpointing" in line]
    assert len(refused) == 2, result.stderr[-3000:]  # the saves due at the first two bad steps
    assert checkpoint_is_finite(out, last_good)


@contextlib.contextmanager
def mounted(path, *mount_args: str):
    """``mount *mount_args path`` for the duration (root)."""
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", *mount_args, str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


@pytest.fixture
def can_mount():
    require_system_tools("mounting a tmpfs", ("mount", "umount"), needs_root=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line_and_latest_stays_good(
    data_dir, tmp_path, can_mount
):
    """On a 6 MiB tmpfs the first checkpoint (about 4 MiB) fits and the second does not:
    the run stops at the second with one line saying where and how much, latest names the
    first, and nothing of the second is left. A resume from there, given space, goes on."""
    out = tmp_path / "disk" / "run"
    with mounted(tmp_path / "disk", "-t", "tmpfs", "-o", "size=6m", "tmpfs"):
        result = deepspeed(
            train_args(data_dir, out, "cpu_zero2.json", 20, "--save-every", 5), check=False
        )
        assert result.returncode == 4, result.stderr[-3000:]
        (line,) = errors(result)
        where = re.escape(str(out / "checkpoints"))
        pattern = (
            rf"global_step000010 not written: {where} has [\d.]+ MiB free, the checkpoint "
            r"needs about [\d.]+ MiB \(the size of the previous one\) \(seen by rank \d\); latest "
            r"still names global_step000005"
        )
        assert re.search(pattern, line), line
        assert latest_tag(out) == "global_step000005" and tags(out) == ["global_step000005"]
        assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, 11))
        subprocess.run(["cp", "-a", str(out), str(tmp_path / "copy")], check=True)

    resumed = deepspeed(
        train_args(
            data_dir, tmp_path / "copy", "cpu_zero2.json", 20, "--save-every", 5, "--resume", "auto"
        )
    )
    assert "resumed from" in resumed.stderr and "finished at step 20" in resumed.stderr


@pytest.mark.slow
def test_a_read_only_or_too_small_checkpoint_directory_is_one_line(data_dir, tmp_path, can_mount):
    """A read-only checkpoints directory, and a disk too small for even the first
    checkpoint (judged by an estimate from the model and optimizer): one line each, exit
    code 4, no checkpoint, the run's metrics kept."""
    out = tmp_path / "ro"
    (out / "checkpoints").mkdir(parents=True)
    small = tmp_path / "small"
    with (
        mounted(out / "checkpoints", "--bind", "-o", "ro", str(out / "checkpoints")),
        mounted(small, "-t", "tmpfs", "-o", "size=1m", "tmpfs"),
    ):
        # two runs on two disks, independent of each other: at once
        result, too_small = at_once(
            lambda: single(train_args(data_dir, out, "cpu_zero0.json", 4, "--save-every", 2)),
            lambda: single(train_args(data_dir, small / "run", "cpu_zero0.json", 3)),
        )
        assert result.returncode == 4, result.stderr[-3000:]
        (line,) = errors(result)
        assert "global_step000002 not written: cannot write in" in line, line
        assert "Read-only file system" in line and "latest still names no checkpoint" in line
        assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2]

        result = too_small
        assert result.returncode == 4, result.stderr[-3000:]
        (line,) = errors(result)
        assert "global_step000003 not written" in line, line
        assert "estimated from the model and optimizer" in line
        assert not list((small / "run" / "checkpoints").glob("global_step*"))
