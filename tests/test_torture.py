"""SIGKILL torture: a 2-rank run is killed again and again (SIGKILL to the launcher's whole
process group, so no rank and no launcher can clean up) at seeded moments, some of them
inside checkpoint writes, and restarted with ``--resume auto`` each time. It must end
exactly where an uninterrupted run ends and leave nothing behind in /dev/shm.

Kills are aimed at observed progress, not at absolute times, so a slow or shared machine
moves them but does not change what they hit. Where each kill landed is read back from
the run directory after the process group is dead, and reported with the schedule."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field

import pytest
import torch
from test_train import (
    REPO,
    RUN,
    final_state,
    free_port,
    train_args,
    train_losses,
    val_losses,
)

SEED = int(os.environ.get("TORTURE_SEED", 5))  # another seed, another schedule
STEPS, SAVE_EVERY = 24, 3
ARGS = (
    "cpu_zero2.json",
    STEPS,
    "--save-every",
    SAVE_EVERY,
    "--eval-every",
    12,
    "--keep-checkpoints",
    2,
)
# The stages of pretrain.checkpoint.save, in order, as they show in a tag directory; a
# checkpoint kill fires at the first poll that sees its stage while ``latest`` still
# names an older checkpoint.
STAGES = {
    "directory": lambda tag: os.path.isdir(tag),
    "deepspeed-shards": lambda tag: bool(glob.glob(os.path.join(tag, "*_states.pt"))),
    "run-state": lambda tag: os.path.isfile(os.path.join(tag, "run_state.json")),
    "files-json": lambda tag: os.path.isfile(os.path.join(tag, "files.json")),
}
POLL_S = 0.002  # while a checkpoint is written: no pause (files.json to latest is ~3 ms)
START_TIMEOUT_S = 600  # a first run ever JIT-compiles DeepSpeed's CPU comm op (~90 s)
STEP_TIMEOUT_S = 300
SHM = "/dev/shm"


def tag_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"global_step{step:06d}")


def tags(run_dir) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(f"{run_dir}/checkpoints/global_step*"))


def latest_step(run_dir: str) -> int:
    """The step ``latest`` names; 0 when there is none (a fresh start)."""
    try:
        with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
            return int(re.fullmatch(r"global_step(\d+)", f.read().strip())[1])
    except FileNotFoundError:
        return 0


def metrics_lines(run_dir: str) -> list[str]:
    """metrics.jsonl as written so far (read while a run appends: a last line may be cut)."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def record_of(line: str) -> dict | None:
    """A metrics line's record; None for a line cut mid-write."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def train_step_of(line: str) -> int | None:
    """The step of a train-loss line; None for other lines and for a cut one."""
    record = record_of(line)
    return record["step"] if record and "loss" in record else None


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies do not count)."""
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@dataclass
class Attempt:
    """One launch of the run: ``deepspeed`` in a session of its own, output to a log."""

    data: str
    run_dir: str
    log_path: str
    port: int = field(default_factory=free_port)

    def __post_init__(self):
        self.start_step = latest_step(self.run_dir)
        self.started_ns = time.time_ns()
        self.started = time.monotonic()
        # lines of steps after the checkpoint: this attempt drops them when it starts
        self.stale = {
            line
            for line in metrics_lines(self.run_dir)
            if (train_step_of(line) or 0) > self.start_step
        }
        self.existing_tags = set(glob.glob(os.path.join(self.run_dir, "checkpoints", "*")))
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(self.port), RUN]
        cmd += train_args(self.data, self.run_dir, *ARGS, "--resume", "auto")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def last_step(self) -> int:
        """The newest step this attempt has logged (its start step if none)."""
        lines = [line for line in metrics_lines(self.run_dir) if line not in self.stale]
        return max([self.start_step, *filter(None, map(train_step_of, lines))])

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def written_in(self, tag: str) -> list[str]:
        """What of ``tag`` this attempt has written (names relative to it)."""
        names = []
        for root, dirs, files in os.walk(tag):
            for name in dirs + files:
                path = os.path.join(root, name)
                try:
                    if os.stat(path).st_mtime_ns >= self.started_ns:
                        names.append(os.path.relpath(path, tag))
                except FileNotFoundError:
                    continue
        return sorted(names)

    def wait_until(self, condition, what: str, timeout: float, hot=lambda: False) -> bool:
        """Poll until ``condition()``, without pausing while ``hot()``; False when the
        run ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0 if hot() else POLL_S)
        self.kill()
        raise AssertionError(
            f"timed out after {timeout} s waiting for {what}:\n{self.log()[-3000:]}"
        )

    def kill(self) -> None:
        """SIGKILL to the launcher's whole process group; returns once all of it is dead."""
        self.killed_after_s = time.monotonic() - self.started
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while group_alive(self.proc.pid):
            assert time.monotonic() < deadline, "the killed process group did not die"
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill what is left of this attempt (after a failure)."""
        if self.proc.poll() is None or group_alive(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                self.kill()


def workspaces(port: int) -> list[str]:
    """DeepSpeed's CPU all-reduce workspaces of the run on ``port``."""
    return glob.glob(os.path.join(SHM, f"deepspeed_allreduce_buffer_*_{port}_*"))


def aim(attempt: Attempt, kind: str, rng: random.Random) -> str | None:
    """Wait for the moment ``kind`` aims at and return what was seen then; None when the
    run finished first."""
    run_dir = attempt.run_dir
    if kind == "start-up":
        # the ranks have met: DeepSpeed's shm workspaces exist until the run unlinks them
        # (right after), and config.json is written once the engine is built
        config = os.path.join(run_dir, "config.json")

        def started() -> bool:
            return bool(workspaces(attempt.port)) or (
                os.path.isfile(config) and os.stat(config).st_mtime_ns >= attempt.started_ns
            )

        if not attempt.wait_until(started, "the ranks to meet", START_TIMEOUT_S):
            return None
        seen = workspaces(attempt.port)
        return f"shm workspaces {[os.path.basename(p) for p in seen]}" if seen else "config.json"
    if kind == "step":
        # a random moment inside a step: one step's time (its own, the first is slow)
        # measured between two lines, then a random part of the next
        target = attempt.start_step + rng.randint(2, SAVE_EVERY + 2)
        times = []
        for step in (target - 1, target):
            if not attempt.wait_until(
                lambda step=step: attempt.last_step() >= min(step, STEPS),
                f"step {step}",
                START_TIMEOUT_S,
            ):
                return None
            times.append(time.monotonic())
        delay = rng.random() * (times[1] - times[0])
        time.sleep(delay)
        return f"step {target} + {delay:.3f} s"
    # a checkpoint stage: aim at the first save point ahead that this attempt writes anew
    stage = kind
    misses = []
    first = attempt.start_step + rng.randint(1, SAVE_EVERY)
    for step in range(first, STEPS + 1):
        tag = tag_dir(run_dir, step)
        if step % SAVE_EVERY or tag in attempt.existing_tags:
            continue

        def complete(tag=tag, step=step) -> bool:
            return latest_step(run_dir) >= step and os.path.isfile(os.path.join(tag, "files.json"))

        seen = attempt.wait_until(
            lambda tag=tag, stage=stage: STAGES[stage](tag) or complete(),
            f"stage {stage} of {os.path.basename(tag)}",
            START_TIMEOUT_S,
            hot=lambda tag=tag: os.path.isdir(tag),  # the save is under way: a few ms count
        )
        if not seen:
            return None
        if not complete():
            return f"{os.path.basename(tag)} at {stage}" + (f" (missed {misses})" if misses else "")
        misses.append(step)  # the write went by between two polls: aim at the next one
        if len(misses) >= 2 and stage == "files-json":
            stage = "run-state"  # the files.json-to-latest window is a few ms
    return None


def latest_problem(run_dir: str) -> str | None:
    """What is wrong with the checkpoint ``latest`` names (it must be complete and verify
    against its files.json), or None."""
    from pretrain.checkpoint import CheckpointRef, verify
    from pretrain.config import ConfigError

    step = latest_step(run_dir)
    if not step:
        return None
    tag = tag_dir(run_dir, step)
    if not os.path.isfile(os.path.join(tag, "files.json")):
        return f"latest names {os.path.basename(tag)}, which has no files.json"
    try:
        verify(CheckpointRef(os.path.dirname(tag), os.path.basename(tag)))
    except ConfigError as e:
        return str(e)
    return None


def landing(attempt: Attempt) -> tuple[str, bool]:
    """Where a kill landed, read from the run directory once the group is dead; and
    whether that was inside a checkpoint write (begun by this attempt, ``latest`` not yet
    naming it)."""
    last = attempt.last_step()
    if last == attempt.start_step:
        return f"start-up (no step after {last} logged)", False
    if last % SAVE_EVERY and last != STEPS:
        return f"after step {last}, between checkpoints", False
    if latest_step(attempt.run_dir) >= last:
        return f"after checkpoint {last} was complete (pruning, or the next step)", False
    tag = tag_dir(attempt.run_dir, last)
    written = attempt.written_in(tag)
    if not written:
        return f"after step {last}, its checkpoint not begun", False
    name = os.path.basename(tag)
    if "files.json" in written:
        return f"{name}: files.json written, latest not yet replaced", True
    return f"{name} being written (on disk: {', '.join(written)}; no files.json)", True


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_a_straight_run(data_dir, tmp_path):
    rng = random.Random(SEED)
    # one kill in start-up, one in a step, two inside checkpoint writes: one between
    # files.json and the new latest, one at another stage
    others = [stage for stage in STAGES if stage != "files-json"]
    kinds = ["start-up", "step", "files-json", rng.choice(others)]
    rng.shuffle(kinds)
    # after this kill, a metrics line cut mid-write
    torn = rng.choice([i for i, kind in enumerate(kinds) if kind != "start-up"])
    schedule = [f"seed {SEED} (TORTURE_SEED), kills {kinds}, a torn metrics line after kill {torn}"]

    def report() -> str:
        return "\n  ".join(schedule)

    shm_before = set(os.listdir(SHM))
    attempts: list[Attempt] = []
    started = time.monotonic()
    try:
        # the uninterrupted run, alongside (it uses the cores while the launchers start)
        straight = tmp_path / "straight"
        attempts.append(Attempt(data_dir, str(straight), str(tmp_path / "straight.log")))
        other_port = free_port()
        while other_port == attempts[0].port:  # both launch at once
            other_port = free_port()
        run_dir = str(tmp_path / "killed")
        in_checkpoint = 0
        for number in range(len(kinds) + 1):
            log_path = str(tmp_path / f"attempt{number}.log")
            attempt = Attempt(
                data_dir, run_dir, log_path, other_port if number == 0 else free_port()
            )
            attempts.append(attempt)
            begin = attempt.start_step
            kind = kinds[number] if number < len(kinds) else None
            seen = aim(attempt, kind, rng) if kind else None
            if seen is None or attempt.proc.poll() is not None:
                # the last attempt, or one the run outran: it must finish
                code = attempt.proc.wait(timeout=START_TIMEOUT_S + STEP_TIMEOUT_S)
                assert code == 0, f"attempt {number}:\n{attempt.log()[-3000:]}\n  {report()}"
                schedule.append(
                    f"attempt {number}: from step {begin}, ran to the end "
                    f"({time.monotonic() - attempt.started:.0f} s)"
                )
            else:
                attempt.kill()
                where, during_checkpoint = landing(attempt)
                in_checkpoint += during_checkpoint
                schedule.append(
                    f"kill {number} ({kind}, from step {begin}, after "
                    f"{attempt.killed_after_s:.1f} s): aimed at {seen}; landed {where}; "
                    f"latest now step {latest_step(run_dir)}"
                )
                assert attempt.last_step() > begin or kind == "start-up", (
                    f"kill {number} came before any progress\n  {report()}"
                )
                problem = latest_problem(run_dir)
                assert problem is None, f"after kill {number}: {problem}\n  {report()}"
                if number == torn:  # what a kill inside an append would leave
                    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                        f.write(f'{{"step": {attempt.last_step() + 1}, "loss": 5.')
            log = attempt.log()
            resumed = re.search(r"resumed from \S+ at step (\d+)", log)
            if resumed or attempt.last_step() > begin:  # a start-up kill may come before
                assert (int(resumed[1]) if resumed else 0) == begin, (
                    f"attempt {number} should start at step {begin}:\n{log[-2000:]}\n  {report()}"
                )
            assert "is corrupt" not in log, f"latest named a broken checkpoint\n  {report()}"
            if kind is None or attempt.proc.returncode == 0:
                break
        code = attempts[0].proc.wait(timeout=START_TIMEOUT_S + STEP_TIMEOUT_S)
        assert code == 0, f"the straight run:\n{attempts[0].log()[-3000:]}"
        schedule.append(f"all: {time.monotonic() - started:.0f} s")
        print("\n  " + report())
        assert len(attempts) == 1 + len(kinds) + 1, f"the run outran the kills\n  {report()}"
        assert in_checkpoint, f"no kill landed inside a checkpoint write\n  {report()}"

        torn_lines = [line for line in metrics_lines(run_dir) if record_of(line) is None]
        assert not torn_lines, f"a cut metrics line was kept: {torn_lines}\n  {report()}"
        assert train_losses(run_dir) == train_losses(straight), report()
        assert [s for s, _ in train_losses(run_dir)] == list(range(1, STEPS + 1)), report()
        assert val_losses(run_dir) == val_losses(straight), report()
        table_a, model_a = final_state(straight)
        table_b, model_b = final_state(run_dir)
        assert torch.equal(table_a, table_b), report()
        assert model_a.keys() == model_b.keys()
        assert all(torch.equal(model_a[k], model_b[k]) for k in model_a), report()
        # --keep-checkpoints holds through kills: no half-deleted or stray tag directory
        assert tags(run_dir) == tags(straight), report()
    finally:
        for attempt in attempts:
            attempt.stop()
        ports = [attempt.port for attempt in attempts]
        leaked = sorted(
            name
            for name in set(os.listdir(SHM)) - shm_before
            if any(f"_{port}_" in name for port in ports)
        )
        for name in leaked:  # ours: removed whatever the outcome, then failed on
            os.remove(os.path.join(SHM, name))
    assert not leaked, f"left in {SHM} by the killed runs: {leaked}\n  {report()}"
