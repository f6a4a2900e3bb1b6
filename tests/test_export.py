"""python -m pretrain.export for real: checkpoints of every kind to a Hugging Face directory
that transformers loads offline, with the run's own numbers."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from test_train import at_once, deepspeed, in_pairs, train_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
KINDS = {
    "zero0": ("cpu_zero0.json",),
    "zero3": ("cpu_zero3.json",),
    "pipeline": ("cpu_pipeline.json", "--pipeline-stages", 2),
}


def export(run_dir, out, *extra, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "pretrain.export", str(run_dir), "--output", str(out), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=OFFLINE,
        timeout=300,
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """The same tiny model trained 6 steps as ZeRO-0, ZeRO-3 and a 2-stage pipeline run
    (dropout 0: the same math), each exported."""
    root = tmp_path_factory.mktemp("export")

    def train_and_export(kind):
        ds, *extra = KINDS[kind]
        run = root / kind
        deepspeed(train_args(data_dir, run, ds, 6, "--dropout", 0, "--eval-every", 3, *extra))
        export(run, root / f"hf_{kind}")
        return run, root / f"hf_{kind}"

    # the three runs do not depend on each other: all at once
    done = at_once(*(lambda kind=kind: train_and_export(kind) for kind in KINDS))
    return dict(zip(KINDS, done))


def hf_model(hf_dir):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(hf_dir).eval()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_the_export_reproduces_the_runs_own_validation_loss(runs, kind):
    """The exported BertForMaskedLM, on the run's validation batches, gives the validation
    loss and accuracy the run itself logged with its full-sequence model."""
    from data_prep.manifest import load_manifest
    from pretrain.data import TokenShards, validation_batches
    from pretrain.masking import DynamicMasker

    run, hf_dir = runs[kind]
    config = json.load(open(run / "config.json"))
    logged = [json.loads(line) for line in open(run / "metrics.jsonl")]
    final = [r for r in logged if "val_loss" in r and r["step"] == 6][0]
    manifest = load_manifest(config["data"]["dir"])
    special = manifest.special
    masker = DynamicMasker(special.all, special.mask, manifest.vocab_size, config["run"]["seed"])
    shards = TokenShards(manifest, "valid")
    micro = config["deepspeed"]["train_micro_batch_size_per_gpu"]
    dp_size = 2 // config["run"]["pipeline_stages"]
    model = hf_model(hf_dir)
    loss_sum = correct = predictions = 0.0
    with torch.no_grad():
        for dp_rank in range(dp_size):
            eval_batches = config["run"]["eval_batches"]
            for b in validation_batches(
                shards, masker, special.pad, micro, eval_batches, dp_rank, dp_size
            ):
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
                predicted = b.labels != -100
                loss_sum += float(
                    F.cross_entropy(logits[predicted], b.labels[predicted], reduction="sum")
                )
                correct += float((logits[predicted].argmax(-1) == b.labels[predicted]).sum())
                predictions += int(predicted.sum())
    assert abs(loss_sum / predictions - final["val_loss"]) <= 1e-5 * final["val_loss"]
    assert correct / predictions == pytest.approx(final["val_acc"], abs=1e-9)


@pytest.mark.slow
def test_every_checkpoint_kind_exports_the_same_network(runs):
    """ZeRO-0, ZeRO-3 and the pipeline trained the same network the same way: their exports
    agree parameter by parameter, the ZeRO runs to rounding, the pipeline (other micro-batch
    order per rank) to Adam's amplified rounding, far below what a misplaced tensor would
    differ by (two layers differ by ~0.02 on average)."""
    from safetensors.torch import load_file

    tensors = {k: load_file(str(hf / "model.safetensors")) for k, (_, hf) in runs.items()}
    names = set(tensors["zero0"])
    assert all(set(t) == names for t in tensors.values())
    for name in names:
        a, zero3, pipe = (tensors[k][name] for k in ("zero0", "zero3", "pipeline"))
        assert torch.allclose(a, zero3, rtol=1e-5, atol=1e-6), name
        assert (a - pipe).abs().mean() < 5e-4 and (a - pipe).abs().max() < 1e-2, name
    layers = [tensors["zero0"][f"bert.encoder.layer.{i}.output.dense.weight"] for i in range(4)]
    assert all((layers[i] - layers[i + 1]).abs().mean() > 1e-2 for i in range(3))


@pytest.mark.slow
def test_the_exported_model_gives_our_full_sequence_logits(runs):
    """Our full-sequence model and the exported BertForMaskedLM agree within 1e-5 on text
    encoded by the exported tokenizer: pairs, padding, token type ids as HF builds them."""
    from transformers import AutoTokenizer

    from pretrain.export import checkpoint_of, load_model

    run, hf_dir = runs["pipeline"]
    ours, _ = load_model(checkpoint_of(str(run), None))
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    enc = tokenizer(
        ["the school of the united states", "a loss", "tax and the state"],
        ["second sentence of the pair", "b", "c d e f"],
        padding=True,
        return_tensors="pt",
    )
    assert enc["token_type_ids"].max() == 1 and (enc["attention_mask"] == 0).any()
    with torch.no_grad():
        expected = ours.full_logits(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        got = hf_model(hf_dir)(**enc).logits
    real = enc["attention_mask"].bool()
    assert (expected[real] - got[real]).abs().max() <= 1e-5


@pytest.mark.slow
def test_the_directory_loads_offline_in_a_fresh_process(runs):
    run, hf_dir = runs["zero3"]
    script = f"""
import json
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, pipeline
d = {str(hf_dir)!r}
tok = AutoTokenizer.from_pretrained(d)
AutoModel.from_pretrained(d)
mlm = AutoModelForMaskedLM.from_pretrained(d)
fill = pipeline("fill-mask", model=d)
out = fill("the school of the [MASK] states")
print(json.dumps({{"fast": tok.is_fast, "tokens": [o["token"] for o in out],
    "strs": [o["token_str"] for o in out], "vocab": len(tok), "pad": tok.pad_token_id,
    "mask": tok.mask_token_id}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=OFFLINE, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    config = json.load(open(run / "config.json"))
    from data_prep.manifest import load_manifest

    manifest = load_manifest(config["data"]["dir"])
    assert found["fast"] and found["vocab"] == manifest.vocab_size
    assert found["pad"] == manifest.special.pad and found["mask"] == manifest.special.mask
    assert len(found["tokens"]) == 5 and all(0 <= t < manifest.vocab_size for t in found["tokens"])
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=manifest.tokenizer_path)
    pieces = [sp.id_to_piece(t) for t in found["tokens"]]
    assert all(s.strip() == p.replace("\u2581", "").strip() for s, p in zip(found["strs"], pieces))

    card = (hf_dir / "README.md").read_text()
    assert "loss_ema" in card and "6 of 6" in card and "validation MLM loss" in card
    rows = (hf_dir / "importance_table.tsv").read_text().splitlines()
    assert rows[0] == "token_id\tpiece\tcount\tscore" and len(rows) == manifest.vocab_size + 1
    config_json = json.load(open(hf_dir / "config.json"))
    assert (
        config_json["model_type"] == "bert" and config_json["pad_token_id"] == manifest.special.pad
    )
    assert config_json["hidden_act"] == "gelu" and config_json["layer_norm_eps"] == 1e-12


@pytest.mark.slow
def test_bad_checkpoints_are_one_line_errors_and_leave_no_directory(runs, tmp_path):
    run, _ = runs["zero3"]
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (
        broken / "checkpoints" / "global_step000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    ).unlink()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("mine")
    cases = [
        (broken, (), "is corrupt", "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"),
        (tmp_path / "nowhere", (), "holds no checkpoint", ""),
        (run, ("--checkpoint", "global_step000099"), "no such checkpoint", "global_step000099"),
    ]
    outs = [tmp_path / f"hf{i}" for i in range(len(cases))]
    # four exports that must refuse, each its own process and output, two at a time
    attempts = [(source, out, extra) for (source, extra, *_), out in zip(cases, outs)]
    *results, over_taken = in_pairs(
        lambda attempt: export(*attempt[:2], *attempt[2], check=False),
        [*attempts, (run, taken, ())],
    )
    for (_, _, *fragments), out, result in zip(cases, outs, results):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
        assert lines[0].startswith("pretrain.export: error: ") and all(
            f in lines[0] for f in fragments
        )
        assert not out.exists()
    assert "--overwrite" in over_taken.stderr
    assert (taken / "x").read_text() == "mine"


@pytest.mark.slow
def test_a_killed_export_leaves_no_directory_that_half_loads(runs, tmp_path):
    """SIGKILL at seeded random moments of an export: the output is absent or complete."""
    run, _ = runs["zero0"]
    command = [sys.executable, "-m", "pretrain.export", str(run), "--output"]
    # when the output appears in an export left alone (the process lives on after that)
    started, timed = (
        time.perf_counter(),
        subprocess.Popen(
            [*command, str(tmp_path / "timed")], cwd=REPO, env=OFFLINE, stderr=subprocess.DEVNULL
        ),
    )
    while not (tmp_path / "timed").exists() and timed.poll() is None:
        time.sleep(0.01)
    duration = time.perf_counter() - started
    assert timed.wait() == 0
    rng = random.Random(5)
    outcomes = []
    for attempt in range(5):
        out = tmp_path / f"hf{attempt}"
        proc = subprocess.Popen(
            [*command, str(out)],
            cwd=REPO,
            env=OFFLINE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.2, 1.05) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "timed"))
            hf_model(out)
        outcomes.append(out.exists())
    assert not all(outcomes), "no kill landed before the end: the test measured nothing"
    export(run, tmp_path / "hf0", "--overwrite")  # a rerun clears a killed run's leftovers
    assert not list(tmp_path.glob("hf0.tmp-*"))


@pytest.mark.slow
def test_a_universal_checkpoint_exports_the_weights_it_was_made_from(runs, tmp_path):
    from safetensors.torch import load_file

    run, hf_dir = runs["zero3"]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    converted = subprocess.run(
        [sys.executable, "-m", "pretrain.universal", str(copy)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert converted.returncode == 0, converted.stderr[-2000:]
    export(copy, tmp_path / "hf", "--checkpoint", "global_step000006_universal")
    ours = load_file(str(tmp_path / "hf" / "model.safetensors"))
    expected = load_file(str(hf_dir / "model.safetensors"))
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[k], expected[k]) for k in ours)


@pytest.mark.slow
def test_finetune_takes_a_run_dir_exports_it_once_and_reuses_it(runs, tmp_path):
    """python -m finetune --model RUN_DIR: the real export into OUT/exported_model, reused
    by the next run into the same OUT."""
    run, hf_dir = runs["zero0"]
    out = tmp_path / "ft"
    command = [sys.executable, "-m", "finetune", "--model", str(run), "--task"]
    command += ["builtin:next-sentence", "--output", str(out), "--seeds", "1", "--epochs", "0.05"]
    for expected in ("exporting", "reusing"):
        result = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, env=OFFLINE, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert expected in result.stderr
    results = json.load(open(out / "results.json"))
    assert results["exported_from"] == str(run) and results["model"] == str(out / "exported_model")
    accuracy = results["tasks"]["next-sentence"]["metrics"]["accuracy"]["per_seed"]["1"]
    assert 0.0 <= accuracy <= 1.0
    from safetensors.torch import load_file

    ours, reference = (
        load_file(str(d / "model.safetensors")) for d in (out / "exported_model", hf_dir)
    )
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
