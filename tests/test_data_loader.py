"""The pretraining loader: global order, data-parallel slices, O(1) resume, validation set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from corpus import documents, write_txt

from data_prep.cli import main as data_prep
from data_prep.manifest import load_manifest
from pretrain.data import PretrainLoader, SampleOrder, TokenShards, validation_batches
from pretrain.masking import DynamicMasker


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    write_txt(tmp / "c.txt", documents(600, seed=7))
    out = str(tmp / "data")
    assert (
        data_prep(
            [
                "--input",
                str(tmp / "c.txt"),
                "--output",
                out,
                "--seq-len",
                "32",
                "--vocab-size",
                "200",
                "--workers",
                "1",
                "--shard-rows",
                "100",
                "--valid-fraction",
                "0.1",
            ]
        )
        == 0
    )
    return load_manifest(out)


def make_loader(manifest, dp_rank=0, dp_size=1, micro=4, global_batch=16, consumed=0):
    special = manifest.special
    masker = DynamicMasker(special.all, special.mask, manifest.vocab_size, seed=3)
    return PretrainLoader(
        TokenShards(manifest, "train"),
        masker,
        special.pad,
        global_batch,
        micro,
        dp_rank,
        dp_size,
        seed=11,
        consumed_samples=consumed,
    )


def step_batches(loader):
    return list(loader.next_step())


def test_shards_are_one_indexable_array(manifest):
    shards = TokenShards(manifest, "train")
    assert len(shards.shards) > 2 and len(shards) == manifest.split("train")["rows"]
    everything = np.concatenate([np.asarray(s) for s in shards.shards])
    picks = np.array([0, len(shards) - 1, 99, 100, 101, 57, 250])
    assert (shards.gather(picks) == everything[picks]).all()


def test_data_parallel_ranks_split_the_same_global_batch(manifest):
    one = make_loader(manifest, micro=4)
    two = [make_loader(manifest, dp_rank=r, dp_size=2, micro=2) for r in range(2)]
    for _ in range(3):
        single = step_batches(one)
        split = [b for loader in two for b in step_batches(loader)]
        for field in ("sample_indices", "input_ids", "labels"):
            # same samples and the same masks whatever the data-parallel layout
            assert torch.equal(
                torch.cat([getattr(b, field) for b in single]),
                torch.cat([getattr(b, field) for b in split]),
            )


def test_resume_from_consumed_samples_gives_the_same_batches(manifest):
    straight = make_loader(manifest)
    batches = [step_batches(straight) for _ in range(5)]
    resumed = make_loader(manifest)
    resumed.load_state_dict({"consumed_samples": 3 * 16})
    for expected in batches[3:]:
        got = step_batches(resumed)
        for e, g in zip(expected, got):
            assert torch.equal(e.input_ids, g.input_ids) and torch.equal(e.labels, g.labels)
            assert torch.equal(e.sample_indices, g.sample_indices)


def test_each_epoch_is_a_seeded_permutation(manifest):
    n = manifest.split("train")["rows"]
    order = SampleOrder(n, seed=5)
    epochs, indices = order.positions(0, 3 * n)
    for e in range(3):
        assert sorted(indices[epochs == e].tolist()) == list(range(n))
    assert not np.array_equal(indices[:n], indices[n : 2 * n])
    # a window across an epoch boundary is the end of one permutation and the start of the next
    e2, i2 = SampleOrder(n, seed=5).positions(n - 3, 6)
    assert e2.tolist() == [0, 0, 0, 1, 1, 1] and np.array_equal(i2, indices[n - 3 : n + 3])


def test_batches_are_masked_and_padded_correctly(manifest):
    batch = step_batches(make_loader(manifest))[0]
    special = manifest.special
    predicted = batch.labels != -100
    assert predicted.any()
    assert (
        batch.attention_mask
        == (TokenShards(manifest, "train").gather(batch.sample_indices.numpy()) != special.pad)
    ).all()
    assert not (predicted & ~batch.attention_mask).any(), "padding is never predicted"


def test_validation_set_is_fixed_and_evenly_split(manifest):
    shards = TokenShards(manifest, "valid")
    special = manifest.special
    masker = DynamicMasker(special.all, special.mask, manifest.vocab_size, seed=3)
    per_rank = [list(validation_batches(shards, masker, special.pad, 4, 3, r, 2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    again = list(validation_batches(shards, masker, special.pad, 4, 3, 0, 2))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(per_rank[0], again))
    seen = torch.cat([b.sample_indices for r in per_rank for b in r])
    assert len(set(seen.tolist())) == len(seen)
