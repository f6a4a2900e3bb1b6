"""Token importance (pretrain/importance.py): selection, the EMA update, and its all_reduce."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.importance import ImportanceTable

VOCAB = 50
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
ALLOW = (UNK, CLS, SEP, MASK)
DENY = (PAD,)


def table(strategy="loss_ema", **kwargs) -> ImportanceTable:
    return ImportanceTable(VOCAB, strategy, allow_ids=ALLOW, deny_ids=DENY, **kwargs)


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_ids(batch, seq_len, seed=0, low=5) -> torch.Tensor:
    return torch.randint(low, VOCAB, (batch, seq_len), generator=gen(seed))


# -- selection ----------------------------------------------------------------------------


def test_select_shape_order_and_uniqueness():
    ids = random_ids(6, 20)
    kept = table().select(ids, 7, gen())
    assert kept.shape == (6, 7) and kept.dtype == torch.int64
    assert (kept[:, 1:] > kept[:, :-1]).all()  # ascending, hence unique
    assert kept.min() >= 0 and kept.max() < 20


def test_select_keeps_the_highest_scores():
    t = table()
    t.table = torch.arange(VOCAB, dtype=torch.float32)  # higher id = more important
    ids = torch.tensor([[10, 40, 20, 30, 45, 5]])
    assert t.select(ids, 3, gen()).tolist() == [[1, 3, 4]]


def test_allow_listed_tokens_are_always_kept():
    t = table()
    t.table = torch.linspace(100.0, 0.0, VOCAB)  # specials (low ids) get the highest EMA...
    t.table[list(ALLOW)] = -50.0  # ...except the allow list, made the least important of all
    ids = random_ids(32, 24, seed=1)
    ids[:, 0] = CLS
    ids[:, 11] = SEP
    ids[:, 5] = MASK
    ids[::2, 17] = UNK
    kept = t.select(ids, 6, gen())
    for row, positions in zip(ids, kept):
        allowed = {p for p, v in enumerate(row.tolist()) if v in ALLOW}
        assert allowed <= set(positions.tolist())


def test_pad_is_never_kept_while_another_token_can_be():
    t = table()
    t.table[PAD] = 1e6  # the stored value does not matter: deny is applied at selection time
    ids = random_ids(16, 20, seed=2)
    real_lengths = torch.randint(3, 21, (16,), generator=gen(3))
    for row, length in enumerate(real_lengths.tolist()):
        ids[row, length:] = PAD
    k = 8
    kept = t.select(ids, k, gen())
    for row, length in enumerate(real_lengths.tolist()):
        kept_pad = (ids[row, kept[row]] == PAD).sum().item()
        assert kept_pad == max(0, k - length)  # PAD only to fill rows with fewer than k tokens


def test_allow_and_deny_are_reapplied_after_updates():
    t = table(beta=0.0)  # each update replaces the value, to make the point quickly
    t.accumulate(torch.tensor([PAD, CLS, 7]), torch.tensor([1e5, 0.0, 1.0]))
    t.synchronize_and_apply()
    # The stored values are plain EMA values, never +-inf...
    assert t.table[PAD] == 1e5 and t.table[CLS] == 0.0 and torch.isfinite(t.table).all()
    # ...and selection still keeps [CLS] and drops [PAD].
    ids = torch.tensor([[CLS, PAD, 7, 8, 9, PAD]])
    kept = t.select(ids, 3, gen()).tolist()[0]
    assert 0 in kept and 1 not in kept and 5 not in kept


def test_frequency_keeps_rare_tokens():
    counts = np.full(VOCAB, 1000, dtype=np.int64)
    counts[[20, 21, 22]] = [3, 0, 7]  # rare, unseen, rare
    t = table("frequency", token_counts=counts)
    assert t.table[21] == 0.0 and t.table[20] == pytest.approx(-math.log(4))
    ids = torch.tensor([[30, 20, 31, 32, 21, 33, 22, 34]])
    assert t.select(ids, 3, gen()).tolist() == [[1, 4, 6]]
    with pytest.raises(ValueError, match="token_counts"):
        table("frequency")
    with pytest.raises(ValueError, match="shape"):
        table("frequency", token_counts=np.ones(VOCAB + 1))


def test_equal_scores_spread_uniformly_over_positions():
    # All ids equal -> every position equally likely. Pearson chi-square over positions
    # with a fixed seed; 61.10 is the 0.999 quantile of chi2 with 31 degrees of freedom.
    seq_len, k, rows = 32, 8, 4000
    ids = torch.full((rows, seq_len), 9)
    kept = table().select(ids, k, gen(7))
    counts = torch.bincount(kept.reshape(-1), minlength=seq_len).double()
    expected = rows * k / seq_len
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 61.10, counts.tolist()
    # The same positions for the same generator state: the tie-break is seeded.
    assert torch.equal(kept, table().select(ids, k, gen(7)))
    assert not torch.equal(kept, table().select(ids, k, gen(8)))


def test_ties_are_not_broken_by_position():
    # Two tied groups: only the order between equal scores is random, never the position.
    t = table()
    t.table[10], t.table[11] = 5.0, 1.0
    ids = torch.tensor([[11] * 10 + [10] * 10]).expand(2000, 20)
    kept = t.select(ids, 12, gen(3))  # all ten 10s, plus two of the ten tied 11s
    assert (kept >= 10).sum(dim=1).eq(10).all()
    low = kept[kept < 10]
    counts = torch.bincount(low, minlength=10).double()  # 4000 picks over 10 positions
    chi_square = ((counts - 400.0) ** 2 / 400.0).sum().item()
    assert chi_square < 27.88, counts.tolist()  # 0.999 quantile of chi2 with 9 dof


def test_random_strategy_draws_fresh_scores_and_respects_allow_deny():
    t = table("random")
    ids = random_ids(8, 16, seed=4)
    ids[:, 0] = CLS
    ids[:, -3:] = PAD
    g = gen(11)
    first, second = t.select(ids, 5, g), t.select(ids, 5, g)
    assert not torch.equal(first, second)
    for kept in (first, second):
        assert (kept[:, 0] == 0).all()
        assert (kept < 13).all()
    t.accumulate(torch.tensor([5]), torch.tensor([3.0]))  # a no-op for this strategy
    t.synchronize_and_apply()
    assert torch.equal(t.table, torch.zeros(VOCAB))


def test_none_strategy_keeps_everything():
    t = table("none")
    ids = random_ids(2, 6)
    assert t.select(ids, 6, gen()).tolist() == [list(range(6))] * 2
    with pytest.raises(ValueError, match="none"):
        t.select(ids, 3, gen())


def test_bad_arguments():
    with pytest.raises(ValueError, match="strategy"):
        table("loss")
    with pytest.raises(ValueError, match="both"):
        ImportanceTable(VOCAB, allow_ids=[CLS], deny_ids=[CLS])
    with pytest.raises(ValueError, match="outside"):
        ImportanceTable(VOCAB, allow_ids=[VOCAB])
    with pytest.raises(ValueError, match="k must be"):
        table().select(random_ids(1, 4), 5, gen())


# -- the EMA update -----------------------------------------------------------------------


def test_ema_update_hand_computed():
    beta = 0.9
    t = table(beta=beta)
    init = math.log(VOCAB)
    # Micro-batch 1: labels of a [2, 4] batch; -100 slots are not predicted and the caller
    # (the model) passes only the predicted ones, in row-major order.
    labels = torch.tensor([[7, -100, 9, 7], [-100, 7, 12, -100]])
    losses = torch.tensor([[1.0, 99.0, 2.0, 3.0], [99.0, 5.0, 4.0, 99.0]])
    predicted = labels != -100
    t.accumulate(labels[predicted], losses[predicted])
    # Micro-batch 2 of the same optimizer step.
    t.accumulate(torch.tensor([9, 13]), torch.tensor([6.0, 0.5]))
    t.synchronize_and_apply()

    expected = torch.full((VOCAB,), init, dtype=torch.float32)
    # A repeated id counts every occurrence, across micro-batches too.
    expected[7] = beta * init + (1 - beta) * (1.0 + 3.0 + 5.0) / 3
    expected[9] = beta * init + (1 - beta) * (2.0 + 6.0) / 2
    expected[12] = beta * init + (1 - beta) * 4.0
    expected[13] = beta * init + (1 - beta) * 0.5
    torch.testing.assert_close(t.table, expected, rtol=0, atol=1e-6)
    assert t.table.dtype == torch.float32

    # The accumulator was reset: a second apply with nothing accumulated changes nothing.
    after = t.table.clone()
    t.synchronize_and_apply()
    assert torch.equal(t.table, after)


def test_ema_from_model_outputs():
    # The model's token_losses / target_ids are what accumulate() needs.
    from pretrain.model import BertForTokenDropPretraining, ModelConfig

    torch.manual_seed(0)
    model = BertForTokenDropPretraining(ModelConfig.from_preset("tiny", vocab_size=VOCAB)).eval()
    ids = random_ids(2, 10, seed=5)
    labels = torch.full_like(ids, -100)
    labels[0, [1, 4]] = 8
    labels[1, 3] = 8
    labels[1, 6] = 21
    out = model(ids, None, labels)
    t = table(beta=0.5)
    t.accumulate(out.target_ids, out.token_losses)
    t.synchronize_and_apply()
    logits = model.full_logits(ids)
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    init = math.log(VOCAB)
    expected_8 = 0.5 * init + 0.5 * (nll[0, 1] + nll[0, 4] + nll[1, 3]) / 3
    assert t.table[8].item() == pytest.approx(expected_8.item(), rel=1e-5)
    assert t.table[21].item() == pytest.approx((0.5 * init + 0.5 * nll[1, 6]).item(), rel=1e-5)
    assert t.table[9].item() == pytest.approx(init)


def test_state_dict_roundtrip_and_validation():
    t = table(beta=0.5)
    t.accumulate(torch.tensor([7, 8]), torch.tensor([1.0, 2.0]))
    t.synchronize_and_apply()
    state = t.state_dict()
    fresh = table(beta=0.5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.table, t.table)
    assert torch.equal(fresh.checksum(), t.checksum())
    with pytest.raises(ValueError, match="beta"):
        table(beta=0.9).load_state_dict(state)
    with pytest.raises(ValueError, match="strategy"):
        table("random").load_state_dict(state)
    with pytest.raises(ValueError, match="vocab_size"):
        ImportanceTable(VOCAB + 1, beta=0.5).load_state_dict(state)


def test_checksum_sees_a_one_ulp_difference():
    a, b = table(), table()
    assert torch.equal(a.checksum(), b.checksum())
    b.table[17] = torch.nextafter(b.table[17], torch.tensor(10.0))
    assert a.checksum()[1] != b.checksum()[1]


# -- two processes over gloo --------------------------------------------------------------

# Per-rank micro-batches. Losses are multiples of 1/8 and counts small, so every sum is
# exact in float32 and the reduction order cannot change a bit.
RANK_DATA = {
    0: [([7, 9, 7], [1.0, 2.5, 0.25]), ([11], [4.0])],
    1: [([7, 12], [3.0, 0.125]), ([9, 9, 13], [1.5, 2.0, 0.75])],
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        t = ImportanceTable(VOCAB, "loss_ema", allow_ids=ALLOW, deny_ids=DENY, beta=0.75)
        for ids, losses in RANK_DATA[rank]:
            t.accumulate(torch.tensor(ids), torch.tensor(losses))
        t.synchronize_and_apply()
        t.verify_synchronized()
        torch.save(t.table, os.path.join(out_dir, f"table{rank}.pt"))
        # A table that drifted on one rank is caught on every rank.
        if rank == 1:
            t.table[30] += 1.0
        try:
            t.verify_synchronized()
            caught = False
        except RuntimeError:
            caught = True
        torch.save(caught, os.path.join(out_dir, f"caught{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_end_bit_identical_and_equal_to_single_process(tmp_path):
    mp.spawn(_gloo_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    table0 = torch.load(tmp_path / "table0.pt")
    table1 = torch.load(tmp_path / "table1.pt")
    assert torch.equal(table0, table1)

    single = ImportanceTable(VOCAB, "loss_ema", allow_ids=ALLOW, deny_ids=DENY, beta=0.75)
    for rank in (0, 1):
        for ids, losses in RANK_DATA[rank]:
            single.accumulate(torch.tensor(ids), torch.tensor(losses))
    single.synchronize_and_apply()
    assert torch.equal(table0, single.table)
    assert not torch.equal(single.table, table().table)  # the update did something
    assert torch.load(tmp_path / "caught0.pt") and torch.load(tmp_path / "caught1.pt")


def test_non_finite_losses_never_enter_the_table():
    t = table(beta=0.5)
    before = t.table.clone()
    ids = torch.tensor([7, 7, 9, 11, 12])
    losses = torch.tensor([float("nan"), 2.0, float("inf"), float("-inf"), 1.0])
    t.accumulate(ids, losses)
    t.synchronize_and_apply()
    assert torch.isfinite(t.table).all()
    assert t.table[7] == 0.5 * before[7] + 0.5 * 2.0  # the NaN left out, its neighbour kept
    assert t.table[12] == 0.5 * before[12] + 0.5 * 1.0
    assert t.table[9] == before[9] and t.table[11] == before[11]  # only non-finite: untouched


def _nan_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        t = ImportanceTable(VOCAB, "loss_ema", allow_ids=ALLOW, deny_ids=DENY, beta=0.75)
        bad = float("nan") if rank == 1 else 1.0  # one rank overflows on id 7
        t.accumulate(torch.tensor([7, 9]), torch.tensor([bad, 0.5]))
        t.synchronize_and_apply()
        t.verify_synchronized()
        torch.save(t.table, os.path.join(out_dir, f"nan{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_nan_on_one_rank_leaves_the_tables_finite_and_identical(tmp_path):
    mp.spawn(_nan_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    table0, table1 = torch.load(tmp_path / "nan0.pt"), torch.load(tmp_path / "nan1.pt")
    assert torch.equal(table0, table1) and torch.isfinite(table0).all()
    start = table().table
    assert table0[7] == 0.75 * start[7] + 0.25 * 1.0  # rank 0's loss alone


def _skip_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        t = ImportanceTable(VOCAB, "loss_ema", allow_ids=ALLOW, deny_ids=DENY, beta=0.75)
        for step, skipped in enumerate((False, True, False)):
            loss = float(step + 1 + rank)
            t.accumulate(torch.tensor([7, 9]), torch.tensor([loss, 10 * loss]))
            if skipped:  # the trainer's decision is the same on every rank
                t.discard()
            else:
                t.synchronize_and_apply()
        t.verify_synchronized()
        torch.save(t.table, os.path.join(out_dir, f"skip{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_skipped_step_leaves_the_table_as_if_it_never_happened(tmp_path):
    """Steps 1 and 3 update the table; step 2 (an fp16 overflow: the optimizer skipped it)
    is discarded on both ranks, which stay identical."""
    mp.spawn(_skip_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    table0, table1 = torch.load(tmp_path / "skip0.pt"), torch.load(tmp_path / "skip1.pt")
    assert torch.equal(table0, table1)
    expected = table(beta=0.75)
    for step in (0, 2):  # the mean over the ranks of step + 1 + rank
        mean = step + 1.5
        expected.accumulate(torch.tensor([7, 9]), torch.tensor([mean, 10 * mean]))
        expected.synchronize_and_apply()
    assert torch.allclose(table0, expected.table)
    assert not torch.equal(table0, table().table)
