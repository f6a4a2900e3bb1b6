"""The pretraining loader: global order, data-parallel slices, O(1) resume, validation set."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from corpus import documents, write_txt
from scipy import stats

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


# -- the sample order: a seeded bijection per epoch, computed per index -------------


def epoch_orders(num_samples: int, seeds, epochs: int) -> np.ndarray:
    """The whole order of each (seed, epoch): [len(seeds) * epochs, num_samples]."""
    rows = [SampleOrder(num_samples, s).positions(0, epochs * num_samples)[1] for s in seeds]
    return np.concatenate(rows).reshape(-1, num_samples)


# small N, primes, powers of 2 and 4 and their neighbours (a power of 2 needs no cycle
# walking, one more walks the most: its domain is twice as large)
BIJECTION_SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 1000]
BIJECTION_SIZES += [1023, 1024, 1025, 2047, 2048, 2049, 4095, 4096, 4097, 100_003]


@pytest.mark.parametrize("num_samples", BIJECTION_SIZES)
def test_every_epoch_of_the_order_is_a_permutation(num_samples):
    for seed in (0, 1, 2**40 + 3, -5):
        order = SampleOrder(num_samples, seed)
        epochs, indices = order.positions(0, 3 * num_samples)
        assert epochs.dtype == indices.dtype == np.int64
        assert np.array_equal(epochs, np.repeat(np.arange(3), num_samples))
        for e in range(3):
            got = np.sort(indices[epochs == e])
            assert np.array_equal(got, np.arange(num_samples)), (num_samples, seed, e)


def test_the_order_is_deterministic_and_differs_by_seed_and_epoch():
    n = 1000
    first = SampleOrder(n, seed=7).positions(0, 2 * n)[1]
    assert np.array_equal(first, SampleOrder(n, seed=7).positions(0, 2 * n)[1])
    other_seed = SampleOrder(n, seed=8).positions(0, 2 * n)[1]
    # two independent permutations of 1000 agree at ~1 place; a shared structure at many
    assert (first[:n] == other_seed[:n]).sum() < 10
    assert (first[:n] == first[n:]).sum() < 10, "epochs 0 and 1 must be shuffled apart"
    assert not np.array_equal(first[:n], np.arange(n))


@pytest.mark.parametrize("num_samples", [1, 3, 16, 1000])
def test_any_window_of_the_stream_is_the_slice_of_a_longer_one(num_samples):
    order = SampleOrder(num_samples, seed=21)
    total = 5 * num_samples + 17
    epochs, indices = order.positions(0, total)
    starts = [0, 1, num_samples - 1, num_samples, 2 * num_samples - 2, 3 * num_samples + 5]
    for start in starts:
        for count in (0, 1, 2, 7, num_samples + 3):
            if start + count <= total:
                fresh = SampleOrder(num_samples, seed=21)  # no state carried over
                e, i = fresh.positions(start, count)
                assert np.array_equal(e, epochs[start : start + count])
                assert np.array_equal(i, indices[start : start + count]), (start, count)


def test_the_order_is_pinned():
    """A change to any output of the order must come with a new ``SampleOrder.ALGORITHM``
    (checkpoints record it and refuse to resume across a change); then update this."""
    assert SampleOrder.ALGORITHM == "feistel-v1"
    got = {n: SampleOrder(n, seed=1234).positions(n - 2, 6)[1].tolist() for n in PINNED}
    assert got == PINNED


PINNED = {
    10: [6, 7, 0, 5, 3, 1],
    1_000_000_000: [392765729, 63533829, 700589812, 382263445, 376565817, 126959989],
    2**40: [1024758681707, 190084731739, 671346784037, 352198960648, 228633933037, 550343197510],
}


@pytest.mark.parametrize("num_samples", [10**9, 2**40])
def test_large_orders_are_in_range_distinct_and_allocate_nothing_of_size_n(num_samples):
    order = SampleOrder(num_samples, seed=3)
    for start in (0, num_samples - 50_000, 7 * num_samples + 123_456_789):
        epochs, indices = order.positions(start, 100_000)
        assert ((indices >= 0) & (indices < num_samples)).all()
        for e in np.unique(epochs):
            mine = indices[epochs == e]
            assert len(np.unique(mine)) == len(mine)
    assert len(np.unique(epochs)) == 1 and epochs[0] == 7
    tracemalloc.start()
    try:
        for start in (0, 5 * num_samples - 100):
            order = SampleOrder(num_samples, seed=4)
            order.positions(start, 512)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes for two batches of 512"


def test_the_order_takes_any_int64_size_and_refuses_what_it_cannot_index():
    n = 2**62 + 3
    epochs, indices = SampleOrder(n, seed=9).positions(n - 500, 1000)
    assert epochs.tolist() == [0] * 500 + [1] * 500
    assert ((indices >= 0) & (indices < n)).all() and len(np.unique(indices[:500])) == 500
    with pytest.raises(ValueError, match="no sequence"):
        SampleOrder(0, seed=1)
    with pytest.raises(ValueError, match="out of range"):
        SampleOrder(10, seed=1).positions(-1, 4)
    with pytest.raises(ValueError, match="out of range"):
        SampleOrder(n, seed=1).positions(2**63 - 10, 20)


def test_the_order_is_a_uniform_looking_shuffle_of_each_position():
    """Over 10,000 (seed, epoch) pairs at N = 100: each position's sample is uniform (a
    chi-square test of the position x sample table), consecutive positions are
    independent (position x difference of the two samples), and the number of fixed
    points is Poisson(1)-like, as for a uniformly random permutation."""
    n = 100
    perms = epoch_orders(n, seeds=range(20), epochs=500)  # [10_000, n]
    s = len(perms)
    where = np.broadcast_to(np.arange(n), perms.shape)
    table = np.bincount((where * n + perms).ravel(), minlength=n * n).reshape(n, n)
    chi2 = ((table - s / n) ** 2 / (s / n)).sum()
    assert stats.chi2.sf(chi2, (n - 1) ** 2) > 1e-6, chi2
    steps = (perms[:, 1:] - perms[:, :-1]) % n  # [s, n - 1], in 1..n-1
    pairs = np.bincount((where[:, :-1] * n + steps).ravel(), minlength=n * n).reshape(n, n)
    pairs = pairs[: n - 1, 1:]  # each position's row over the differences 1..n-1
    chi2 = ((pairs - s / (n - 1)) ** 2 / (s / (n - 1))).sum()
    assert stats.chi2.sf(chi2, (n - 1) * (n - 2)) > 1e-6, chi2
    fixed = (perms == np.arange(n)).sum(axis=1)
    assert abs(fixed.mean() - 1) < 0.06 and abs(fixed.var() - 1) < 0.15


@pytest.mark.parametrize("num_samples", [5, 8, 13, 16])
def test_pairs_of_positions_are_jointly_uniform(num_samples):
    """For every pair of positions (p, q), the pair of samples (perm(p), perm(q)) is uniform
    over the n(n-1) ordered pairs of distinct samples: a weak network (too few rounds, or
    a round function without mixing) leaves structure between positions that differ in
    one half of their bits."""
    n = num_samples
    perms = epoch_orders(n, seeds=range(4), epochs=9_000)  # [36_000, n]
    expected = len(perms) / (n * (n - 1))
    off_diagonal = ~np.eye(n, dtype=bool).ravel()
    worst = 1.0
    for p in range(n):
        for q in range(p + 1, n):
            table = np.bincount(perms[:, p] * n + perms[:, q], minlength=n * n)
            chi2 = ((table[off_diagonal] - expected) ** 2 / expected).sum()
            worst = min(worst, stats.chi2.sf(chi2, n * (n - 1) - 1))
    # n(n-1)/2 tests: Bonferroni at 1e-4 overall
    assert worst > 1e-4 / (n * (n - 1) / 2), worst


def test_a_large_order_has_no_runs_or_correlation_between_neighbours():
    n = 2**20
    for seed in (0, 1, 2):
        indices = SampleOrder(n, seed).positions(0, n)[1].astype(np.float64)
        # a random permutation's neighbours correlate at -1/(n-1) +- 1/sqrt(n) = 0.001
        assert abs(np.corrcoef(indices[:-1], indices[1:])[0, 1]) < 0.005
        step = np.diff(indices)
        # successions (next index = this one + 1): Poisson(1) for a random permutation
        assert (step == 1).sum() <= 8
        # longest ascending run: ~9 for a random permutation of 2^20
        rises = np.flatnonzero(step < 0)  # where an ascending run ends
        assert np.diff(rises).max() <= 16
