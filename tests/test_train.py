"""pretrain/run.py for real: DeepSpeed engines on 2 gloo ranks, checkpoints, exact resume."""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from corpus import make_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "pretrain", "run.py")


_ports_given: set[int] = set()


def free_port() -> int:
    """A free port, never one given before in this session: launches that start at the
    same time must not pick the same one."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port


def at_once(*calls):
    """Call independent launches (zero-argument callables) at the same time, each in a
    thread of its own, and return their results in order; an assertion failing in one is
    raised here once all have ended. For much of a launch one process keeps one core busy
    (the launcher importing DeepSpeed, then its child; ranks exiting): two launches at once
    fill the other core."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


def in_pairs(call, items):
    """``[call(item) for item in items]``, two at a time (this machine has 2 cores)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(call, items))


def deepspeed(args, ranks=2, timeout=600, check=True):
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), RUN, *args]
    # its own process group: when the timeout fires, the ranks go with the launcher
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # DeepSpeed's CPU all-reduce workspaces (64 MiB of RAM per rank) must not outlive a run
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    return result


def train_args(data, out, ds="cpu_zero2.json", steps=40, *extra):
    return [
        "--deepspeed_config",
        os.path.join(REPO, "ds_configs", ds),
        "--data",
        data,
        "--output",
        str(out),
        "--model",
        "tiny",
        "--train-steps",
        str(steps),
        "--eval-every",
        "20",
        "--eval-batches",
        "2",
        "--save-every",
        "0",
        *map(str, extra),
    ]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in metrics(run_dir) if "loss" in r]


def val_losses(run_dir):
    return [(r["step"], r["val_loss"], r["val_acc"]) for r in metrics(run_dir) if "val_loss" in r]


def final_state(run_dir):
    """(importance table, model weights) of the latest checkpoint."""
    ckpt = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(ckpt, "latest")) as f:
        tag = f.read().strip()
    name = "mp_rank_00_model_states.pt"
    if not os.path.exists(os.path.join(ckpt, tag, name)):  # ZeRO-3 names it per rank
        name = "zero_pp_rank_0_" + name
    state = torch.load(os.path.join(ckpt, tag, name), weights_only=False)
    return state["importance"]["table"], state["module"]


# Steps of the stop-and-resume runs, stopped halfway, evaluated at the stop and at the end.
# Exact resume needs only a few steps on each side of the checkpoint (the warm-up, 10 steps,
# ends after the resume of a 16-step run); ZeRO-2 trains 40 for the checks of a whole run.
RESUME_STEPS = {0: 16, 1: 16, 2: 40, 3: 16}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stop_and_resume_equals_a_straight_run(data_dir, tmp_path, stage):
    steps = RESUME_STEPS[stage]
    half = steps // 2
    args = (f"cpu_zero{stage}.json", steps, "--eval-every", half)
    straight = tmp_path / "straight"
    split = tmp_path / "split"
    # the straight run and the first half of the split one do not depend on each other
    _, first = at_once(
        lambda: deepspeed(train_args(data_dir, straight, *args)),
        lambda: deepspeed(train_args(data_dir, split, *args, "--stop-at-step", half)),
    )
    assert f"stopped (--stop-at-step) at step {half}" in first.stderr
    assert train_losses(split)[-1][0] == half
    second = deepspeed(train_args(data_dir, split, *args, "--resume", "auto"))
    assert "resumed from" in second.stderr

    assert train_losses(straight) == train_losses(split), "bit-identical losses on CPU fp32"
    assert len(train_losses(split)) == steps
    assert [s for s, _, _ in val_losses(split)] == [half, steps]
    assert val_losses(straight) == val_losses(split)
    table_a, model_a = final_state(straight)
    table_b, model_b = final_state(split)
    assert torch.equal(table_a, table_b)
    if stage < 3:  # ZeRO-3 keeps the weights in its partitioned files
        assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)

    if stage == 2:  # the full behaviour of one run, checked once
        losses = [loss for _, loss in train_losses(straight)]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, "the loss falls"
        line = metrics(straight)[0]
        for key in ("step", "loss", "lr", "tokens_per_s", "kept_fraction"):
            assert key in line
        assert line["kept_fraction"] == 0.5
        assert [s for s, _, _ in val_losses(straight)] == [20, 40]
        config = json.load(open(straight / "config.json"))
        assert (
            config["run"]["token_drop"] == "loss_ema"
            and config["deepspeed"]["train_batch_size"] == 16
        )
        assert config["deepspeed"]["scheduler"]["params"]["total_num_steps"] == 40
        assert not torch.equal(table_a, torch.full_like(table_a, table_a[0])), "the table learned"


def single(args, **kw):
    return subprocess.run(
        [sys.executable, RUN, *args], cwd=REPO, capture_output=True, text=True, timeout=600, **kw
    )


@pytest.mark.slow
def test_signal_checkpoints_and_the_resumed_run_continues_exactly(data_dir, tmp_path):
    # the last 6 steps run without dropping (--full-seq-final), across the resume
    args = ("cpu_zero0.json", 20, "--full-seq-final", 6)
    straight = tmp_path / "straight"
    out = tmp_path / "signalled"
    with ThreadPoolExecutor(1) as pool:  # the straight run alongside the signalled one
        reference = pool.submit(single, train_args(data_dir, straight, *args))
        proc = subprocess.Popen(
            [sys.executable, RUN, *train_args(data_dir, out, *args)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 300
        while time.time() < deadline:
            if (out / "metrics.jsonl").exists() and len(train_losses(out)) >= 5:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=300)
        assert reference.result().returncode == 0
    assert proc.returncode == 0, err[-2000:]
    stopped_at = train_losses(out)[-1][0]
    assert 5 <= stopped_at < 20 and "stopped by a signal" in err
    with open(out / "checkpoints" / "latest") as f:
        assert f.read().strip() == f"global_step{stopped_at:06d}"

    resumed = single(train_args(data_dir, out, *args, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert train_losses(out) == train_losses(straight)
    kept = [r["kept_fraction"] for r in metrics(out) if "loss" in r]
    assert kept == [0.5] * 14 + [1.0] * 6


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run.py: error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_configuration_fails_before_heavy_work(data_dir, tmp_path):
    ok = train_args(data_dir, tmp_path / "r", "cpu_zero0.json", 10)

    def with_(flag, value):
        args = list(ok)
        if flag in args:
            args[args.index(flag) + 1] = str(value)
        else:
            args += [flag, str(value)]
        return args

    short = tmp_path / "short.json"
    short.write_text(json.dumps({"preset": "tiny", "max_position_embeddings": 32}))
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"preset": "tiny", "vocab_size": 30522}))
    broken = tmp_path / "broken.json"
    broken.write_text('{"train_batch_size": 16,')
    cases = [
        (with_("--keep-ratio", 1.5), ["--keep-ratio 1.5"]),
        (with_("--keep-ratio", 0), ["--keep-ratio 0"]),
        (with_("--data", tmp_path / "nope"), ["nope", "no such data directory"]),
        (with_("--resume", tmp_path / "nowhere"), ["--resume", "nowhere"]),
        (with_("--model", short), ["seq_len 64", "max_position_embeddings 32"]),
        (with_("--model", vocab), ["vocab_size 30522", "200"]),
        (with_("--deepspeed_config", broken), ["broken.json", "not valid JSON"]),
    ]
    results = in_pairs(single, [args for args, _ in cases])  # each its own process
    for (_, fragments), result in zip(cases, results):
        one_line_error(result, *fragments)
    assert not (tmp_path / "r").exists(), "nothing was started"


def test_bad_shards_are_one_line_errors_before_any_step(data_dir, tmp_path):
    """A shard truncated, replaced or missing under a run: the run names the file in one
    line before any step (never a pyarrow exception or a wrong batch); a flipped byte that
    keeps the size is found by --verify-data's checksums."""
    import shutil

    def broken_copy(name: str, damage) -> str:
        copy = tmp_path / name
        shutil.copytree(data_dir, copy)
        damage(copy / "train" / "shard-00000.arrow")
        return str(copy)

    def truncate(path):
        path.write_bytes(path.read_bytes()[:-100])

    def flip_a_byte(path):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # inside the tokens: the file still parses
        path.write_bytes(bytes(data))

    def replace_by_another_shard(path):
        shutil.copy(path.parent / "shard-00001.arrow", path)

    cases = [
        (broken_copy("truncated", truncate), [], "shard-00000.arrow", "truncated or replaced"),
        (broken_copy("missing", os.remove), [], "shard-00000.arrow", "missing"),
        (broken_copy("flipped", flip_a_byte), ["--verify-data"], "shard-00000.arrow", "sha256"),
    ]
    shards = sorted((tmp_path / "truncated" / "train").glob("*.arrow"))
    if len(shards) > 1:
        replaced = broken_copy("replaced", replace_by_another_shard)
        cases.append((replaced, ["--verify-data"], "shard-00000.arrow", ""))

    def run_on(case):
        data, extra, *_ = case
        out = tmp_path / f"run-{os.path.basename(data)}"
        return out, single([*train_args(data, out, "cpu_zero0.json", 10), *extra])

    for (_, _, *fragments), (out, result) in zip(cases, in_pairs(run_on, cases)):
        one_line_error(result, *fragments)
        assert not out.exists(), "nothing was started"


@pytest.mark.slow
def test_resume_onto_other_data_or_model_is_refused(data_dir, tmp_path):
    run = tmp_path / "run"
    with ThreadPoolExecutor(1) as pool:  # the other data is prepared while the run trains
        trained = pool.submit(single, train_args(data_dir, run, "cpu_zero0.json", 4))
        other = make_data(tmp_path / "other", seed=22)
        assert trained.result().returncode == 0
    bigger = tmp_path / "bigger.json"
    bigger.write_text(json.dumps({"preset": "tiny", "hidden_size": 128}))
    # three refused starts, each its own process; none of them writes anything
    other_data, other_model, fresh = in_pairs(
        single,
        [
            train_args(other, run, "cpu_zero0.json", 8, "--resume", "auto"),
            [
                *train_args(data_dir, run, "cpu_zero0.json", 8, "--resume", "auto"),
                "--model",
                str(bigger),
            ],
            train_args(data_dir, run, "cpu_zero0.json", 8),
        ],
    )
    one_line_error(other_data, "cannot resume", "other data")
    one_line_error(other_model, "another model", "hidden_size 64 vs 128")
    one_line_error(fresh, "already holds checkpoints")
    # a checkpoint of the version before files.json and the per-index data order
    checkpoint = run / "checkpoints" / "global_step000004"
    (checkpoint / "files.json").unlink()
    state = json.loads((checkpoint / "run_state.json").read_text())
    del state["data_order"]
    (checkpoint / "run_state.json").write_text(json.dumps(state))
    one_line_error(
        single(train_args(data_dir, run, "cpu_zero0.json", 8, "--resume", "auto")),
        "cannot resume",
        "its data order is pcg64-permutation, this version's is feistel",
    )


@pytest.mark.slow
def test_resume_on_another_data_parallel_size_through_a_universal_checkpoint(data_dir, tmp_path):
    run = tmp_path / "run"
    deepspeed(train_args(data_dir, run, "cpu_zero2.json", 16, "--stop-at-step", 8))
    table_at_8, _ = final_state(run)
    resume = train_args(data_dir, run, "cpu_zero2.json", 16, "--resume", "auto")
    # the refused resume reads global_step000008 (latest), the conversion writes beside it
    refused, converted = at_once(
        lambda: single(resume),
        lambda: subprocess.run(
            [sys.executable, "-m", "pretrain.universal", str(run)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        ),
    )
    one_line_error(refused, "written by 2 ranks, this run has 1", "pretrain.universal")
    assert converted.returncode == 0, converted.stderr[-2000:]
    universal = run / "checkpoints" / "global_step000008_universal"
    assert universal.is_dir()
    result = single(train_args(data_dir, run, "cpu_zero2.json", 16, "--resume", universal))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data parallel 1" in result.stderr
    steps = [s for s, _ in train_losses(run)]
    assert steps == list(range(1, 17))
    step9 = [r for r in metrics(run) if r["step"] == 9 and "loss" in r][0]
    assert step9["samples"] == 9 * 16 and step9["lr"] > 5e-4, "the schedule and data continued"
    state = json.load(open(universal / "run_state.json"))
    assert state["universal"] and state["consumed_samples"] == 8 * 16
    assert not torch.equal(table_at_8, torch.full_like(table_at_8, table_at_8[0]))


def test_resume_drops_later_steps_and_a_line_cut_by_a_kill(tmp_path):
    """The metrics of a resumed run: records after the checkpoint's step go, and so does a
    last line that a SIGKILL cut mid-write; the next record starts on a line of its own."""
    from pretrain.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')
    log = MetricsLogger(str(tmp_path), True, total_steps=10, start_step=2)
    log.log({"step": 3, "loss": 0.5})
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        *records[:2],
        {"step": 3, "loss": 0.5},
    ]


def test_rng_states_round_trip_without_unpickling(tmp_path):
    """A rank's RNG file holds tensors and plain values: torch.load(weights_only=True) reads
    it, and the Python, NumPy and torch streams go on exactly where they were saved."""
    import random

    import numpy as np

    from pretrain import checkpoint
    from pretrain.config import ConfigError

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1), np.random.standard_normal()  # cached Gaussians are state too
    path = tmp_path / "rank00000.pt"
    torch.save(checkpoint.rng_state(), path)
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    checkpoint.set_rng_state(checkpoint.load_rng_file(str(path)))
    again = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(3))
    assert expected[:2] == again[:2]
    assert np.array_equal(expected[2], again[2]) and torch.equal(expected[3], again[3])
    # a file that needs unpickling (the format before) is refused in one line
    torch.save({"numpy": np.random.get_state()}, tmp_path / "old.pt")
    with pytest.raises(ConfigError, match="not an RNG state of this version"):
        checkpoint.load_rng_file(str(tmp_path / "old.pt"))


@pytest.mark.slow
def test_checkpoints_prove_themselves_and_only_the_newest_are_kept(data_dir, tmp_path):
    """files.json records every file; --keep-checkpoints 2 keeps two; --resume auto falls
    back from a corrupt latest to the newest checkpoint that verifies, and says so;
    --resume PATH to a corrupt one is a one-line error naming the file."""
    import hashlib

    out = tmp_path / "run"
    args = ("cpu_zero0.json", 15, "--save-every", 5, "--keep-checkpoints", 2)
    deepspeed(train_args(data_dir, out, *args))
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("global_step*")) == [
        "global_step000010",
        "global_step000015",
    ]
    latest = checkpoints / "global_step000015"
    files = json.loads((latest / "files.json").read_text())["files"]
    on_disk = sorted(str(p.relative_to(latest)) for p in latest.rglob("*") if p.is_file())
    assert sorted(files) == [n for n in on_disk if n != "files.json"]
    for name, record in files.items():
        data = (latest / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    model_states = latest / "mp_rank_00_model_states.pt"
    data = bytearray(model_states.read_bytes())
    data[len(data) // 2] ^= 1  # one bit, the size unchanged
    model_states.write_bytes(bytes(data))
    result = deepspeed(
        train_args(data_dir, out, "cpu_zero0.json", 20, *args[2:], "--resume", "auto")
    )
    said = [line for line in result.stderr.splitlines() if "is corrupt" in line]
    assert len(said) == 1, result.stderr[-3000:]
    assert "global_step000015 is corrupt: mp_rank_00_model_states.pt differs" in said[0]
    assert "resuming from global_step000010" in said[0]
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, 21))
    assert sorted(p.name for p in checkpoints.glob("global_step*")) == [
        "global_step000015",
        "global_step000020",
    ]

    rng = checkpoints / "global_step000020" / "rng" / "rank00001.pt"
    rng.write_bytes(rng.read_bytes()[:-10])
    failed = single(train_args(data_dir, out, "cpu_zero0.json", 25, "--resume", rng.parent.parent))
    one_line_error(failed, "global_step000020 is corrupt", "rng/rank00001.pt has")


def test_pruning_also_removes_what_a_kill_left_half_written_or_half_deleted(tmp_path):
    """_prune keeps the newest complete checkpoints; an incomplete one before them (a save
    or an rmtree cut short: no files.json) goes too, and the files a kill leaves under
    temporary names are never recorded as part of a checkpoint."""
    from pretrain.checkpoint import CheckpointRef, _files_of, _prune

    def make(step, complete=True):
        tag = tmp_path / f"global_step{step:06d}"
        (tag / "rng").mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if complete:
            (tag / "files.json").write_text("{}")
        return tag

    make(3, complete=False)  # an rmtree cut short after files.json went
    make(6)
    make(9)
    latest = make(12)
    make(15, complete=False)  # after the step being kept: not ours to touch
    (latest / f"run_state.json{'.tmp-'}123").write_text("cut")
    _prune(str(tmp_path), 12, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "global_step000009",
        "global_step000012",
        "global_step000015",
    ]
    assert _files_of(CheckpointRef(str(tmp_path), latest.name)) == ["mp_rank_00_model_states.pt"]
