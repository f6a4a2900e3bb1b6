"""The step as a GPU needs it, checked on the CPU: no host reads, one graph, bf16, apex.

- A training step reads nothing back on the host; the step statistics are read once per
  logged step, all of a logging window in one transfer, and deferring them changes no
  number (tests/count_reads.py counts the reads).
- ``torch.compile(fullgraph=True)`` compiles the model's forward and backward, token-dropped
  and dense, and equals eager mode within float32 rounding; ``run.py --compile`` runs the
  same graphs through DeepSpeed's engine for a whole run.
- bf16 through DeepSpeed's bf16 section trains and resumes bit for bit, with the loss and
  the importance table in float32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_train import (
    REPO,
    deepspeed,
    final_state,
    metrics,
    one_line_error,
    single,
    train_args,
    train_losses,
    val_losses,
)

from pretrain import apex_support
from pretrain.importance import ImportanceTable
from pretrain.masking import DynamicMasker, max_predictions
from pretrain.model import BertForTokenDropPretraining, ModelConfig

COUNT_READS = os.path.join(REPO, "tests", "count_reads.py")


def count_reads(data_dir, out, *flags):
    args = train_args(data_dir, out, "cpu_zero0.json", 8, "--dropout", 0, *flags)
    args = args[args.index("--data") :]  # count_reads.py takes the config first
    ds = os.path.join(REPO, "ds_configs", "cpu_zero0.json")
    result = subprocess.run(
        [sys.executable, COUNT_READS, args[1], args[3], ds, *args[4:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_step_reads_nothing_on_the_host_and_the_statistics_once_per_logged_step(
    data_dir, tmp_path
):
    # 8 steps of 4 micro-batches; the log every 4 steps, the only evaluation at the end
    deferred = count_reads(data_dir, tmp_path / "every4", "--log-every", 4, "--eval-every", 0)
    assert deferred["code"] == 0
    assert "run_step" not in deferred["ours"], deferred["places"]  # 32 micro-batches: no read
    assert deferred["windows"] == deferred["ours"]["read_steps"] == 2, deferred["places"]
    assert [line["step"] for line in metrics(tmp_path / "every4") if "loss" in line] == [4, 8]

    # the same run read after every step: the same numbers
    eager = count_reads(data_dir, tmp_path / "every1", "--log-every", 1, "--eval-every", 0)
    assert eager["windows"] == eager["ours"]["read_steps"] == 8
    every1 = {s: loss for s, loss in train_losses(tmp_path / "every1")}
    assert train_losses(tmp_path / "every4") == [(4, every1[4]), (8, every1[8])]
    assert val_losses(tmp_path / "every4") == val_losses(tmp_path / "every1")

    # run.py --compile: the model's forward compiled, fullgraph, through the whole loop (the
    # aot_eager backend traces forward and backward as inductor would, without generating
    # code; the test below compares inductor's code with eager mode)
    args = train_args(data_dir, tmp_path / "compiled", "cpu_zero0.json", 8, "--dropout", 0)
    result = single(args + ["--eval-every", "0", "--compile", "aot_eager"])
    assert result.returncode == 0, result.stderr[-3000:]
    losses = train_losses(tmp_path / "compiled")
    assert [s for s, _ in losses] == list(range(1, 9))
    for step, loss in losses:
        assert loss == pytest.approx(every1[step], rel=1e-5), step
    ((_, val_eager, _),) = val_losses(tmp_path / "every1")  # one evaluation, at the end
    ((_, val_compiled, _),) = val_losses(tmp_path / "compiled")
    assert val_compiled == pytest.approx(val_eager, rel=1e-5)


def _batch(seq_len=64, batch=4, vocab=512, padded_row=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq_len), generator=gen)
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    if padded_row is not None:
        ids[padded_row, seq_len // 2 :] = 0
        mask[padded_row, seq_len // 2 :] = False
    masked, labels = DynamicMasker((0, 1, 2, 3, 4), 4, vocab, seed=1)(ids, torch.arange(batch), 0)
    return masked, mask, labels


@pytest.mark.slow
def test_forward_and_backward_compile_as_one_graph_and_equal_eager():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=512, dropout=0.0)
    model = BertForTokenDropPretraining(cfg).train()
    table = ImportanceTable(512, "loss_ema", allow_ids=(2, 3, 4, 1), deny_ids=(0,))
    width = max_predictions(64)
    # fullgraph=True: a graph break anywhere in forward or backward is an error. The
    # token-dropping phase (with a padded row) through inductor, compared with eager mode;
    # the dense phase (no mask) traced whole by aot_eager, which is quick
    phases = {
        "dropped": (*_batch(padded_row=1), True, "inductor"),
        "dense": (*_batch(seed=1), False, "aot_eager"),
    }
    for name, (ids, mask, labels, dropping, backend) in phases.items():
        compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=backend)
        kept_idx = table.select(ids, 32, torch.Generator().manual_seed(3)) if dropping else None
        attention_mask = mask if dropping else None  # the runner passes None without padding
        results = []
        for forward in (model, compiled):
            model.zero_grad()
            out = forward(ids, attention_mask, labels, kept_idx, width)
            out.loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            results.append((out, grads))
        (eager, eager_grads), (comp, comp_grads) = results
        torch.testing.assert_close(comp.loss, eager.loss, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(comp.token_losses, eager.token_losses, rtol=1e-4, atol=1e-5)
        assert torch.equal(comp.target_ids, eager.target_ids)
        for (pname, _), a, b in zip(model.named_parameters(), comp_grads, eager_grads):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=f"{name}: {pname}")


@pytest.mark.slow
def test_bf16_trains_and_resumes_bit_for_bit_with_the_table_in_float32(data_dir, tmp_path):
    ds = "cpu_zero2_bf16.json"
    straight = tmp_path / "straight"
    deepspeed(train_args(data_dir, straight, ds, 12, "--eval-every", 6))
    split = tmp_path / "split"
    deepspeed(train_args(data_dir, split, ds, 12, "--eval-every", 6, "--stop-at-step", 6))
    deepspeed(train_args(data_dir, split, ds, 12, "--eval-every", 6, "--resume", "auto"))

    assert train_losses(straight) == train_losses(split)
    assert len(train_losses(split)) == 12
    assert val_losses(straight) == val_losses(split)
    table_a, model_a = final_state(straight)
    table_b, model_b = final_state(split)
    assert table_a.dtype == torch.float32 and torch.equal(table_a, table_b)
    weights = model_a["encoder.layers.0.qkv.weight"]
    assert weights.dtype == torch.bfloat16, "DeepSpeed's bf16 section trains bf16 weights"
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    losses = [loss for _, loss in train_losses(straight)]
    assert all(map(torch.isfinite, torch.tensor(losses)))


def test_the_loss_and_the_table_feed_stay_float32_under_bf16_weights():
    torch.manual_seed(0)
    model = BertForTokenDropPretraining(ModelConfig.from_preset("tiny", vocab_size=512))
    model = model.to(torch.bfloat16).train()
    ids, mask, labels = _batch(padded_row=2)
    out = model(ids, mask, labels, None, max_predictions(64))
    assert out.loss.dtype == out.token_losses.dtype == torch.float32
    table = ImportanceTable(512, "loss_ema")
    before = table.table.clone()
    table.accumulate(out.target_ids, out.token_losses)
    table.synchronize_and_apply()
    assert table.table.dtype == torch.float32 and not torch.equal(table.table, before)


def test_what_asks_for_apex_fails_in_one_line_without_it_and_nothing_else_needs_it(
    data_dir, tmp_path
):
    if apex_support.available():
        pytest.skip("apex is installed here: the case without it cannot be seen")
    out = tmp_path / "r"
    model = tmp_path / "apex_model.json"
    model.write_text(json.dumps({"preset": "tiny", "kernels": "apex"}))
    args = train_args(data_dir, out, "cpu_zero0.json", 4)
    args[args.index("--model") + 1] = str(model)
    one_line_error(single(args), "apex_model.json", '"kernels": "apex"', "pip install")
    lamb = os.path.join(REPO, "ds_configs", "gpu_zero2_bf16_apex_lamb.json")
    args = train_args(data_dir, out, "cpu_zero0.json", 4)
    args[args.index("--deepspeed_config") + 1] = lamb
    one_line_error(single(args), "gpu_zero2_bf16_apex_lamb.json", "apex.FusedLAMB", "pip install")
    assert not out.exists(), "nothing was started"
    # a configuration that does not ask builds its optimizer and model as before
    config = {"optimizer": {"type": "AdamW", "params": {}}}
    assert apex_support.client_optimizer(config, []) == (None, config)


def test_compile_with_zero3_or_the_pipeline_is_a_one_line_error(data_dir, tmp_path):
    args = train_args(data_dir, tmp_path / "r", "cpu_zero3.json", 4, "--compile")
    one_line_error(single(args), "--compile", "ZeRO stage 3")
    args = train_args(data_dir, tmp_path / "r", "cpu_pipeline.json", 4, "--compile")
    one_line_error(single(args + ["--pipeline-stages", "2"]), "--compile", "--pipeline-stages")
    args = train_args(data_dir, tmp_path / "r", "cpu_zero0.json", 4, "--compile", "nope")
    one_line_error(single(args), "--compile nope", "inductor")
