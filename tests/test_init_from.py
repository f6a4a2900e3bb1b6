"""--init-from: a new run from the weights of a phase-1 run or of a Hugging Face BERT.

The DeepSpeed configs warm the learning rate up from 0, so step 1 of every run trains at
lr 0 (asserted from metrics.jsonl): a checkpoint at step 1 holds the weights the run started
from, which is how "the weights at step 0" are read here, through the real launcher.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from corpus import documents, write_txt
from test_export import export as run_export
from test_train import (
    REPO,
    at_once,
    deepspeed,
    in_pairs,
    metrics,
    one_line_error,
    single,
    train_args,
    train_losses,
    val_losses,
)

from pretrain.checkpoint import CheckpointRef, find_latest
from pretrain.config import ConfigError, parse_args, resolve
from pretrain.export import read_weights
from pretrain.init_from import extend_positions, initial_weights
from pretrain.model import BertForTokenDropPretraining, ModelConfig, hf_bert_state_dict

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
POSITIONS = "embeddings.position_embeddings.weight"


def data_prep(*args) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep",
            "--workers",
            "1",
            "--valid-fraction",
            "0.05",
            *map(str, args),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=OFFLINE,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def export(run_dir, out) -> str:
    run_export(run_dir, out)
    return str(out)


def weights_at(run_dir, tag: str | None = None) -> dict[str, torch.Tensor]:
    directory = os.path.join(run_dir, "checkpoints")
    ref = find_latest(directory) if tag is None else CheckpointRef(directory, tag)
    return read_weights(ref)[1]


def table_at(run_dir, tag: str) -> torch.Tensor:
    ref = CheckpointRef(os.path.join(run_dir, "checkpoints"), tag)
    return read_weights(ref)[2]["importance"]["table"]


@pytest.fixture(scope="module")
def phase_one(data_dir, tmp_path_factory):
    """Phase 1: the tiny model with 64 positions, 8 steps at seq_len 64 on 2 ranks (ZeRO-2:
    the weights come back through DeepSpeed's consolidation), and its export; and the
    phase-2 data at seq_len 128 with phase 1's tokenizer."""
    root = tmp_path_factory.mktemp("phase_one")
    model = root / "tiny64.json"
    model.write_text('{"preset": "tiny", "max_position_embeddings": 64}')
    run = root / "run"
    write_txt(root / "corpus.txt", documents(1500, seed=23))
    at_once(
        lambda: deepspeed(train_args(data_dir, run, "cpu_zero2.json", 8, "--model", model)),
        lambda: data_prep(
            "--input",
            root / "corpus.txt",
            "--output",
            root / "data128",
            "--seq-len",
            128,
            "--tokenizer",
            os.path.join(data_dir, "tokenizer.model"),
        ),  # fmt: skip
    )
    return {"run": run, "model": model, "data128": str(root / "data128"), "root": root}


@pytest.mark.slow
def test_phase_two_starts_from_phase_one_and_trains_at_128(phase_one, tmp_path):
    p1, data128 = phase_one["run"], phase_one["data128"]
    p2 = tmp_path / "phase2"
    args = train_args(data128, p2, "cpu_zero2.json", 8, "--eval-every", 4)
    init = ["--init-from", str(p1), "--extend-positions", "copy"]
    first = deepspeed([*args, *init, "--stop-at-step", "1"])
    assert "--init-from checkpoint" in first.stderr and "extended to 128 by copy" in first.stderr
    assert "the importance table of step 8" in first.stderr
    assert metrics(p2)[0]["lr"] == 0.0, "step 1 trains at lr 0: its checkpoint is step 0's"

    before, after = weights_at(p1), weights_at(p2, "global_step000001")
    assert before.keys() == after.keys()
    for name in before:
        if name != POSITIONS:
            assert torch.equal(before[name], after[name]), name
    assert after[POSITIONS].shape == (128, 64)
    assert torch.equal(after[POSITIONS][:64], before[POSITIONS])
    assert torch.equal(after[POSITIONS][64:], before[POSITIONS]), "copy: rows 64.. repeat 0.."
    # the table came along: ids not predicted in step 1 keep phase 1's learned scores
    learned, carried = table_at(p1, "global_step000008"), table_at(p2, "global_step000001")
    kept = (carried == learned) & (learned != math.log(200))
    assert kept.sum() > 20

    # resumed with the same command, as slurm/pretrain.sbatch does (--resume auto)
    second = deepspeed([*args, *init, "--resume", "auto"])
    assert "resumed from" in second.stderr and "--init-from checkpoint" not in second.stderr
    assert len(train_losses(p2)) == 8 and [s for s, *_ in val_losses(p2)] == [4, 8]
    assert all(math.isfinite(loss) for _, loss in train_losses(p2))
    assert {r["kept_fraction"] for r in metrics(p2) if "loss" in r} == {0.5}

    from transformers import AutoModelForMaskedLM

    hf = AutoModelForMaskedLM.from_pretrained(export(p2, tmp_path / "hf")).eval()
    assert hf.config.max_position_embeddings == 128
    with torch.no_grad():
        assert hf(torch.full((1, 128), 7)).logits.shape == (1, 128, 200)


@pytest.mark.slow
def test_from_a_hugging_face_bert_trains_resumes_exactly_and_exports_its_tokenizer(tmp_path):
    from hf_fixtures import make_hf_bert, make_wordpiece_tokenizer

    tokenizer = make_wordpiece_tokenizer(tmp_path / "tok", documents(800, seed=31), 400)
    source = make_hf_bert(tmp_path / "bert", tokenizer, max_position_embeddings=64)
    write_txt(tmp_path / "corpus.txt", documents(1500, seed=32))
    data = tmp_path / "data"
    data_prep("--input", tmp_path / "corpus.txt", "--output", data, "--seq-len", 64,
              "--tokenizer", source)  # fmt: skip

    straight, split = tmp_path / "straight", tmp_path / "split"
    args = ("cpu_zero2.json", 8, "--eval-every", 4, "--init-from", source)
    _, first = at_once(
        lambda: deepspeed(train_args(data, straight, *args)),
        lambda: deepspeed(train_args(data, split, *args, "--stop-at-step", 1)),
    )
    assert "--init-from Hugging Face BERT" in first.stderr
    assert "a fresh importance table" in first.stderr
    assert metrics(split)[0]["lr"] == 0.0

    # the weights at step 0 are the Hugging Face model's: its logits, to 1e-5
    from transformers import AutoModelForMaskedLM

    original = AutoModelForMaskedLM.from_pretrained(source).eval()
    started = AutoModelForMaskedLM.from_pretrained(export(split, tmp_path / "at1")).eval()
    vocab = original.config.vocab_size  # the tokenizer's size: at most the 400 asked for
    ids = torch.randint(5, vocab, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = original(ids).logits, started(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    deepspeed(train_args(data, split, *args, "--resume", "auto"))
    assert train_losses(split) == train_losses(straight), "bit-identical losses on CPU fp32"
    assert val_losses(split) == val_losses(straight)
    assert {r["kept_fraction"] for r in metrics(split) if "loss" in r} == {0.5}
    final_a, final_b = weights_at(straight), weights_at(split)
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)

    out = export(split, tmp_path / "hf")
    for name in os.listdir(tokenizer):
        with (
            open(os.path.join(tokenizer, name), "rb") as a,
            open(os.path.join(out, name), "rb") as b,
        ):
            assert a.read() == b.read(), f"{name} is the original tokenizer's"


def test_weights_survive_the_round_trip_through_hugging_face_names(tmp_path):
    """Ours -> transformers' names (export) -> ours (--init-from) is the identity, for
    BertForMaskedLM and BertForPreTraining weights (its pooler and NSP head are not read)."""
    from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

    from pretrain.init_from import InitSource

    torch.manual_seed(3)
    cfg = ModelConfig.from_preset("tiny", vocab_size=120, max_position_embeddings=32)
    ours = BertForTokenDropPretraining(cfg)
    state = {k: v.detach() for k, v in ours.state_dict().items()}
    config = BertConfig(**cfg.to_hf_bert_config())
    for kind in (BertForMaskedLM, BertForPreTraining):
        hf = kind(config)
        result = hf.load_state_dict(hf_bert_state_dict(ours), strict=False)
        assert not [k for k in result.missing_keys if not k.startswith(("bert.pooler", "cls.seq"))]
        hf.save_pretrained(tmp_path / kind.__name__)
        source = InitSource(
            given=str(tmp_path / kind.__name__),
            kind="huggingface",
            path=str(tmp_path / kind.__name__),
            step=None,
            source_positions=32,
            extend_positions=None,
            table=False,
            table_note="",
            vocabulary_note="",
        )
        weights, table = initial_weights(source, cfg, seed=0)
        assert table is None and weights.keys() == state.keys()
        for name, value in state.items():
            assert torch.equal(weights[name], value), (kind.__name__, name)


def test_position_rows_are_extended_as_documented():
    weight = torch.arange(12.0).reshape(3, 4)
    copied = extend_positions(weight, 8, "copy", 0.02, seed=0)
    assert torch.equal(copied, weight[[0, 1, 2, 0, 1, 2, 0, 1]])
    drawn = extend_positions(weight, 8, "random", 0.02, seed=5)
    assert torch.equal(drawn[:3], weight) and 0.005 < drawn[3:].std() < 0.05
    assert torch.equal(drawn, extend_positions(weight, 8, "random", 0.02, seed=5))
    assert extend_positions(weight, 3, None, 0.02, seed=0) is weight


# -- bad sources: one-line errors before any heavy work ------------------------------------------


def resolve_error(*argv) -> str:
    with pytest.raises(ConfigError) as caught:
        resolve(parse_args([str(a) for a in argv]))
    return str(caught.value)


@pytest.mark.slow
def test_bad_sources_are_one_line_errors_before_any_work(phase_one, data_dir, tmp_path):
    from transformers import BertConfig, RobertaConfig

    p1, data128 = phase_one["run"], phase_one["data128"]
    ds = os.path.join(REPO, "ds_configs", "cpu_zero0.json")

    def start(data, *extra):
        return ("--deepspeed_config", ds, "--data", data, "--output", tmp_path / "r", *extra)

    empty = tmp_path / "empty"
    empty.mkdir()
    roberta = tmp_path / "roberta"
    RobertaConfig(vocab_size=200, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                  intermediate_size=256).save_pretrained(roberta)  # fmt: skip
    classifier = tmp_path / "classifier"
    BertConfig(vocab_size=200, architectures=["BertForSequenceClassification"]).save_pretrained(
        classifier
    )
    other_data = tmp_path / "other"  # another SentencePiece vocabulary of 200 tokens
    data_prep("--input", phase_one["root"] / "corpus.txt", "--output", other_data,
              "--seq-len", 64, "--vocab-size", 200, "--model-type", "bpe")  # fmt: skip
    hf_of_p1 = export(p1, tmp_path / "hf_p1")
    wide = tmp_path / "wide.json"
    wide.write_text('{"preset": "tiny", "hidden_size": 128}')

    cases = [
        (start(data_dir, "--init-from", empty), "neither a checkpoint of this project"),
        (start(data_dir, "--init-from", tmp_path / "nowhere"), "no such file or directory"),
        (start(data_dir, "--init-from", roberta), "a roberta model, not BERT"),
        (start(data_dir, "--init-from", classifier), "BertForSequenceClassification"),
        (start(other_data, "--init-from", p1), "its vocabulary is not the data's"),
        (
            start(other_data, "--init-from", hf_of_p1),
            "its tokenizer's vocabulary is not the data's",
        ),
        (start(data128, "--init-from", p1), "do not cover the data's seq_len 128"),
        (start(data_dir, "--init-from", p1, "--extend-positions", "copy"), "already cover"),
        (start(data_dir, "--init-from", p1, "--model", wide), "hidden_size 128 vs 64"),
        (start(data_dir, "--init-from", p1, "--resume", p1), "give one of them"),
        (start(data_dir, "--extend-positions", "copy"), "needs --init-from"),
    ]
    for argv, fragment in cases:
        assert fragment in resolve_error(*argv), (argv, fragment)
    # the same checks from the command line: one line, exit code 2, nothing written
    for result, (_, fragment) in zip(
        in_pairs(single, [[str(a) for a in argv] for argv, _ in cases[2:6]]), cases[2:6]
    ):
        one_line_error(result, fragment)
    assert not (tmp_path / "r").exists()

    # a Hugging Face directory this project exported continues on the same vocabulary
    resolved = resolve(parse_args([str(a) for a in start(data_dir, "--init-from", hf_of_p1)]))
    assert resolved.model.hidden_size == 64 and resolved.init.kind == "huggingface"
    assert "tokens are the data's" in resolved.init.vocabulary_note
    weights, _ = initial_weights(resolved.init, resolved.model, seed=0)
    for name, value in weights_at(p1).items():
        assert torch.equal(weights[name], value), name
