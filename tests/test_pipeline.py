"""Pipeline parallelism: the token-dropped encoder as a DeepSpeed PipelineModule."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import (
    at_once,
    deepspeed,
    metrics,
    one_line_error,
    single,
    train_args,
    train_losses,
)

from pretrain.flops import train_step_breakdown
from pretrain.masking import max_predictions
from pretrain.model import ModelConfig
from pretrain.pipeline import layer_costs, pipe_batch

PIPE = "cpu_pipeline.json"


def pipe_args(data, out, steps, *extra):
    return train_args(data, out, PIPE, steps, "--pipeline-stages", 2, *extra)


def test_static_shapes_of_the_pipeline_batch():
    labels = torch.full((3, 64), -100)
    labels[0, [1, 5, 9]] = torch.tensor([7, 8, 9])
    labels[2, 3] = 11
    (ids, mask, kept, out_idx), targets = pipe_batch(
        torch.zeros(3, 64, dtype=torch.int64),
        torch.ones(3, 64, dtype=torch.bool),
        labels,
        torch.zeros(3, 32, dtype=torch.int64),
        width=max_predictions(64),
    )
    # P = round(0.15 * 64): the most the masking predicts in a row of 64 tokens
    assert out_idx.shape == targets.shape == (3, 10) and mask.dtype == torch.int64
    assert out_idx[0, :3].tolist() == [1, 5, 9] and targets[0, :3].tolist() == [7, 8, 9]
    assert (targets[0, 3:] == -100).all() and (targets[1] == -100).all() and targets[2, 0] == 11


def test_stages_are_balanced_by_flops_not_layer_count():
    from deepspeed.runtime.utils import partition_balanced, partition_uniform

    cfg = ModelConfig.from_preset("mid", vocab_size=8192)
    costs = layer_costs(cfg, 512, 0.5)
    total = sum(s.train_flops for s in train_step_breakdown(cfg, 1, 512, 0.5))
    assert abs(sum(costs) - total) / total < 1e-9
    parts = partition_balanced(costs, 2)
    shares = [sum(costs[parts[i] : parts[i + 1]]) / sum(costs) for i in range(2)]
    uniform = partition_uniform(len(costs), 2)
    uniform_shares = [sum(costs[uniform[i] : uniform[i + 1]]) / sum(costs) for i in range(2)]
    assert parts != uniform
    assert max(shares) < max(uniform_shares) and max(shares) < 0.56


@pytest.mark.slow
def test_two_stages_match_a_one_rank_run_and_the_loss_falls(data_dir, tmp_path):
    pipe = tmp_path / "pipe"
    plain = tmp_path / "plain"
    result, plain_result = at_once(  # two independent runs
        lambda: deepspeed(pipe_args(data_dir, pipe, 30, "--dropout", 0)),
        lambda: single(train_args(data_dir, plain, "cpu_zero1.json", 30, "--dropout", 0)),
    )
    assert "pipeline of 2 stages balanced by FLOPs" in result.stderr
    assert plain_result.returncode == 0
    a, b = train_losses(pipe), train_losses(plain)
    assert len(a) == len(b) == 30
    for (step_a, loss_a), (step_b, loss_b) in zip(a, b):
        assert step_a == step_b and abs(loss_a - loss_b) <= 1e-4 * abs(loss_b)
    losses = [loss for _, loss in a]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, "the loss falls"
    val = [r for r in metrics(pipe) if "val_loss" in r]
    assert [r["step"] for r in val] == [20, 30] and all(r["val_loss"] > 0 for r in val)
    assert json.load(open(pipe / "config.json"))["run"]["pipeline_stages"] == 2


@pytest.mark.slow
def test_pipeline_stop_and_resume_equals_a_straight_run(data_dir, tmp_path):
    # --full-seq-final: the activation shapes change (K -> S) for the last 4 steps, after
    # the resume; evaluations (full sequences too) at the stop and at the end
    args = ("--full-seq-final", 4, "--eval-every", 8)
    straight = tmp_path / "straight"
    split = tmp_path / "split"
    at_once(  # the straight run and the first half of the split one are independent
        lambda: deepspeed(pipe_args(data_dir, straight, 16, *args)),
        lambda: deepspeed(pipe_args(data_dir, split, 16, *args, "--stop-at-step", 8)),
    )
    assert [s for s, _ in train_losses(split)] == list(range(1, 9))
    deepspeed(pipe_args(data_dir, split, 16, *args, "--resume", "auto"))
    assert train_losses(split) == train_losses(straight)
    assert [r["kept_fraction"] for r in metrics(split) if "loss" in r] == [0.5] * 12 + [1.0] * 4
    val = [r for r in metrics(split) if "val_loss" in r]
    assert [r["step"] for r in val] == [8, 16]
    assert val == [r for r in metrics(straight) if "val_loss" in r]


@pytest.mark.slow
def test_two_stages_times_two_data_parallel_ranks(data_dir, tmp_path):
    out = tmp_path / "grid"
    result = deepspeed(pipe_args(data_dir, out, 8, "--save-every", 4), ranks=4)
    assert "data parallel 2" in result.stderr
    assert len(train_losses(out)) == 8
    assert (out / "checkpoints" / "global_step000004").is_dir()
    assert (out / "checkpoints" / "latest").read_text().strip() == "global_step000008"


def test_pipeline_with_zero2_is_refused(data_dir, tmp_path):
    one_line_error(
        single(train_args(data_dir, tmp_path / "r", "cpu_zero2.json", 4, "--pipeline-stages", 2)),
        "ZeRO stage 2",
        "0 or 1",
    )
