"""Dynamic masking (pretrain/masking.py): deterministic per sample, BERT's rates, no specials."""

import numpy as np
import pytest
import torch

from pretrain.masking import DynamicMasker, mask_batch, max_predictions

VOCAB = 1000
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = (PAD, UNK, CLS, SEP, MASK)


def masker(seed=1234) -> DynamicMasker:
    return DynamicMasker(SPECIALS, MASK, VOCAB, seed=seed)


def packed_rows(num, seq_len=64, seed=0) -> torch.Tensor:
    """Rows like data_prep's: [CLS] doc [SEP] doc ..., some padded at the end, some [UNK]."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (num, seq_len), generator=gen)
    ids[:, 0] = CLS
    ids[:, 20] = SEP
    ids[::3, 33] = UNK
    ids[1::4, 50:] = PAD
    return ids


def test_deterministic_and_independent_of_batch_composition():
    ids = packed_rows(12)
    index = torch.arange(100, 112)
    masked, labels = masker()(ids, index, epoch=3)
    again = masker()(ids, index, epoch=3)
    assert torch.equal(masked, again[0]) and torch.equal(labels, again[1])

    # Two "ranks" of a world of 2, each with half the global batch, in another order.
    for part in (torch.tensor([7, 2, 11, 0, 5, 9]), torch.tensor([1, 3, 4, 6, 8, 10])):
        part_masked, part_labels = masker()(ids[part], index[part], epoch=3)
        assert torch.equal(part_masked, masked[part])
        assert torch.equal(part_labels, labels[part])
    # A single sample on its own, as after a resume in the middle of an epoch.
    one_masked, one_labels = masker()(ids[4:5], index[4:5], epoch=3)
    assert torch.equal(one_masked[0], masked[4]) and torch.equal(one_labels[0], labels[4])


def test_depends_on_seed_epoch_and_sample_index():
    ids = packed_rows(4)
    index = torch.arange(4)
    _, base = masker()(ids, index, epoch=0)
    assert not torch.equal(base, masker()(ids, index, epoch=1)[1])
    assert not torch.equal(base, masker(seed=99)(ids, index, epoch=0)[1])
    assert not torch.equal(base, masker()(ids, index + 4, epoch=0)[1])
    # Same content under two sample indices gets two different masks.
    same = ids[:1].expand(2, -1)
    _, two = masker()(same, torch.tensor([5, 6]), epoch=0)
    assert not torch.equal(two[0], two[1])


def test_never_masks_special_tokens_or_padding():
    ids = packed_rows(200)
    masked, labels = masker()(ids, torch.arange(200), epoch=0)
    special = torch.isin(ids, torch.tensor(SPECIALS))
    assert (labels[special] == -100).all()
    assert torch.equal(masked[special], ids[special])
    predicted = labels != -100
    assert torch.equal(labels[predicted], ids[predicted])  # labels are the original ids
    assert torch.equal(masked[~predicted], ids[~predicted])  # only predicted positions change


def test_rates_match_bert():
    num, seq_len = 2000, 64
    ids = packed_rows(num, seq_len)
    masked, labels = masker()(ids, torch.arange(num), epoch=0)
    predicted = labels != -100
    maskable = ~torch.isin(ids, torch.tensor(SPECIALS))
    # Exactly round(15%) of each row's maskable positions.
    expected = torch.floor(maskable.sum(1) * 0.15 + 0.5)
    assert torch.equal(predicted.sum(1), expected.long())

    original, replaced = ids[predicted], masked[predicted]
    n = predicted.sum().item()
    to_mask = (replaced == MASK).sum().item() / n
    unchanged = (replaced == original).sum().item() / n
    random_other = ((replaced != MASK) & (replaced != original)).sum().item() / n
    # n is ~17,000: three standard deviations of the 10% shares are ~0.7 points.
    assert to_mask == pytest.approx(0.80, abs=0.01)
    assert unchanged == pytest.approx(0.10 + 0.10 / (VOCAB - 5), abs=0.01)
    assert random_other == pytest.approx(0.10, abs=0.01)

    # Random replacements are never special, and spread over the whole vocabulary.
    randoms = replaced[(replaced != MASK) & (replaced != original)]
    assert not torch.isin(randoms, torch.tensor(SPECIALS)).any()
    assert randoms.min() < 100 and randoms.max() > 900

    # Predicted positions are spread over the row, not bunched at its start.
    positions = predicted.nonzero()[:, 1]
    assert positions.float().mean().item() == pytest.approx(seq_len / 2, rel=0.05)


def test_accepts_numpy_uint16_and_functional_form():
    ids = packed_rows(3).numpy().astype(np.uint16)
    masked, labels = mask_batch(ids, np.array([0, 1, 2]), 0, 1234, SPECIALS, MASK, VOCAB)
    ref_masked, ref_labels = masker()(torch.from_numpy(ids.astype(np.int64)), torch.arange(3), 0)
    assert masked.dtype == torch.int64 and labels.dtype == torch.int64
    assert torch.equal(masked, ref_masked) and torch.equal(labels, ref_labels)


def test_row_without_maskable_tokens_is_left_alone():
    ids = torch.tensor([[CLS, SEP, PAD, PAD], [CLS, 9, 10, SEP]])
    masked, labels = masker()(ids, torch.tensor([0, 1]), epoch=0)
    assert (labels[0] == -100).all() and torch.equal(masked[0], ids[0])
    assert (labels[1] != -100).sum() == 1  # at least one prediction where possible


def test_bad_inputs():
    with pytest.raises(ValueError, match="mask_id"):
        DynamicMasker((PAD, CLS), MASK, VOCAB, seed=0)
    with pytest.raises(ValueError, match="vocabulary"):
        masker()(torch.tensor([[CLS, VOCAB]]), torch.tensor([0]), epoch=0)
    with pytest.raises(ValueError, match="sample_indices"):
        masker()(torch.tensor([[CLS, 9]]), torch.tensor([0, 1]), epoch=0)


@pytest.mark.parametrize("seq_len", [7, 64, 128, 512])
def test_no_row_predicts_more_than_the_static_width(seq_len):
    # rows with no special token at all: every position maskable, the most predictions
    ids = torch.randint(
        len(SPECIALS), VOCAB, (64, seq_len), generator=torch.Generator().manual_seed(0)
    )
    _, labels = masker()(ids, torch.arange(64), epoch=0)
    counts = (labels != -100).sum(1)
    assert int(counts.max()) == max_predictions(seq_len)  # reached, never exceeded
