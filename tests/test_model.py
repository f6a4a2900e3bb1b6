"""Semantics of the token-dropping BERT (pretrain/model.py): pure PyTorch, tiny sizes."""

import json

import pytest
import torch
import torch.nn.functional as F

from pretrain.model import (
    IGNORE_INDEX,
    BertForTokenDropPretraining,
    LayerSplit,
    ModelConfig,
    gather_tokens,
    hf_bert_state_dict,
    layer_split,
    num_kept_tokens,
    prediction_positions,
    scatter_tokens,
)

VOCAB = 97
PAD = 0


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.from_preset(
        "tiny", **{"vocab_size": VOCAB, "max_position_embeddings": 64, **overrides}
    )


def make_model(seed=0, dtype=torch.float64, **overrides) -> BertForTokenDropPretraining:
    torch.manual_seed(seed)
    return BertForTokenDropPretraining(tiny(**overrides)).to(dtype)


def random_kept_idx(batch, seq_len, k, seed=1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(seq_len, generator=gen)[:k].sort().values for _ in range(batch)]
    return torch.stack(rows)


def random_batch(batch=3, seq_len=16, seed=2, pad_from=None):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, seq_len), generator=gen)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.bool)
    if pad_from is not None:
        ids[1, pad_from:] = PAD
        attention_mask[1, pad_from:] = False
    labels = torch.full_like(ids, IGNORE_INDEX)
    predicted = (torch.rand(batch, seq_len, generator=gen) < 0.3) & attention_mask
    predicted[:, 2] = True  # at least one prediction per row
    labels[predicted] = ids[predicted]
    return ids, attention_mask, labels


# -- configuration ------------------------------------------------------------------------


def test_presets_and_overrides():
    def shape(cfg):
        return cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size

    cfg = ModelConfig.from_preset("tiny", vocab_size=123)
    assert shape(cfg) == (4, 64, 2, 256) and cfg.vocab_size == 123
    assert shape(ModelConfig.from_preset("mid")) == (12, 256, 4, 1024)
    assert shape(ModelConfig.from_preset("bert-base")) == (12, 768, 12, 3072)
    assert shape(ModelConfig.from_preset("bert-large")) == (24, 1024, 16, 4096)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("huge")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(num_layers=5), "even"),
        (dict(num_layers=2), ">= 4"),
        (dict(num_heads=3), "divisible"),
        (dict(drop_start_layer=3), "out of range"),
        (dict(drop_start_layer=2, drop_end_layer=1), "out of range"),
        (dict(drop_end_layer=3), "out of range"),
        (dict(dropout=1.0), "dropout"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(kernels="fast"), "kernels"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_config_json_roundtrip(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"preset": "tiny", "vocab_size": 50, "dropout": 0.0}))
    cfg = ModelConfig.from_json(path)
    assert (cfg.num_layers, cfg.vocab_size, cfg.dropout) == (4, 50, 0.0)
    path.write_text(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_json(path) == cfg
    path.write_text(json.dumps({"preset": "tiny", "hiden_size": 8}))
    with pytest.raises(ValueError, match="hiden_size"):
        ModelConfig.from_json(path)


def test_layer_split_default_and_custom():
    assert layer_split(tiny()) == LayerSplit(boundary_layer=1, last_dropped_layer=2)
    split = layer_split(ModelConfig.from_preset("mid"))
    assert split == (5, 10)
    roles = [split.role(i) for i in range(12)]
    assert roles == ["full"] * 5 + ["boundary"] + ["kept"] * 5 + ["full"]
    assert layer_split(ModelConfig.from_preset("bert-large")) == (11, 22)
    assert layer_split(tiny(drop_start_layer=0, drop_end_layer=0)) == (0, 0)


def test_num_kept_tokens():
    assert num_kept_tokens(512, 0.5) == 256
    assert num_kept_tokens(128, 1.0) == 128
    assert num_kept_tokens(10, 0.01) == 1
    with pytest.raises(ValueError, match="keep_ratio"):
        num_kept_tokens(10, 0.0)


# -- the index operations -----------------------------------------------------------------


def test_gather_and_scatter_tokens():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float64).view(2, 5, 3).requires_grad_()
    kept_idx = torch.tensor([[0, 3], [1, 4]])
    kept = gather_tokens(hidden, kept_idx)
    assert torch.equal(kept, torch.stack([hidden[0, [0, 3]], hidden[1, [1, 4]]]))
    assert torch.equal(
        gather_tokens(torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]), kept_idx),
        torch.tensor([[1, 4], [7, 0]]),
    )

    full = torch.zeros(2, 5, 3, dtype=torch.float64, requires_grad=True)
    new = torch.full((2, 2, 3), 7.0, dtype=torch.float64, requires_grad=True)
    merged = scatter_tokens(full, new, kept_idx)
    expected = torch.zeros(2, 5, 3, dtype=torch.float64)
    expected[0, [0, 3]] = 7.0
    expected[1, [1, 4]] = 7.0
    assert torch.equal(merged, expected)
    (merged * torch.arange(1.0, 31.0, dtype=torch.float64).view(2, 5, 3)).sum().backward()
    # full receives the gradient only where it was not overwritten; new gets its positions'.
    assert torch.equal(full.grad[0, 0], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(full.grad[0, 1], torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64))
    assert torch.equal(new.grad[1, 1], torch.tensor([28.0, 29.0, 30.0], dtype=torch.float64))


# -- token dropping -----------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: pretrain.kernels
def test_keeping_every_position_equals_dense(dropout, dtype):
    dense = make_model(dropout=dropout, dtype=dtype).train()
    dropped = make_model(dropout=dropout, dtype=dtype).train()
    ids, attention_mask, labels = random_batch(pad_from=12)
    batch, seq_len = ids.shape
    all_positions = torch.arange(seq_len).expand(batch, seq_len)

    torch.manual_seed(5)  # same dropout masks: both paths draw them in the same order and shapes
    out_dense = dense(ids, attention_mask, labels)
    out_dense.loss.backward()
    torch.manual_seed(5)
    out_drop = dropped(ids, attention_mask, labels, kept_idx=all_positions)
    out_drop.loss.backward()

    torch.testing.assert_close(out_drop.loss, out_dense.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        out_drop.token_losses, out_dense.token_losses, rtol=1e-12, atol=1e-12
    )
    assert torch.equal(out_drop.target_ids, out_dense.target_ids)
    # in float32, the gather's backward sums in another order: rounding differences only
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for (name, p_dense), p_drop in zip(dense.named_parameters(), dropped.parameters()):
        torch.testing.assert_close(p_drop.grad, p_dense.grad, **tol, msg=name)


def _inputs_of(module, store, key):
    def hook(_module, args, kwargs):
        store[key] = (args, kwargs)

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def test_dropped_tokens_rejoin_with_their_boundary_input():
    model = make_model().eval()
    ids, attention_mask, _ = random_batch()
    batch, seq_len = ids.shape
    kept_idx = random_kept_idx(batch, seq_len, k=6)
    split = layer_split(model.cfg)
    layers = model.encoder.layers
    seen = {}
    handles = [
        _inputs_of(layers[split.boundary_layer], seen, "boundary"),
        _inputs_of(layers[split.last_dropped_layer + 1], seen, "rejoin"),
    ]
    model.encode(ids, attention_mask, kept_idx)
    for handle in handles:
        handle.remove()

    boundary_kv = seen["boundary"][0][1]  # hidden_kv: the full sequence entering the boundary layer
    rejoined = seen["rejoin"][0][0]  # hidden_q of the first layer after the dropped ones
    dropped = torch.ones(batch, seq_len, dtype=torch.bool)
    dropped[torch.arange(batch)[:, None], kept_idx] = False
    assert torch.equal(rejoined[dropped], boundary_kv[dropped])
    assert not torch.allclose(rejoined[~dropped], boundary_kv[~dropped])  # kept ones moved on


def _naive_token_drop_encode(model, ids, kept_idx):
    """Reference: one sequence at a time, explicit index selection, the same layer modules."""
    split = layer_split(model.cfg)
    layers = model.encoder.layers
    outputs = []
    for b in range(ids.shape[0]):
        hidden = model.embeddings(ids[b : b + 1])  # [1, S, H]
        for i in range(split.boundary_layer):
            hidden = layers[i](hidden)
        positions = kept_idx[b]
        kept = layers[split.boundary_layer](hidden[:, positions], hidden)
        for i in range(split.boundary_layer + 1, split.last_dropped_layer + 1):
            kept = layers[i](kept)
        hidden = hidden.clone()
        hidden[:, positions] = kept
        for i in range(split.last_dropped_layer + 1, model.cfg.num_layers):
            hidden = layers[i](hidden)
        outputs.append(hidden)
    return torch.cat(outputs)


@pytest.mark.parametrize("drop_layers", [(None, None), (0, 0), (0, 2), (2, 2)])
def test_kept_path_matches_naive_reference(drop_layers):
    start, end = drop_layers
    model = make_model(drop_start_layer=start, drop_end_layer=end).eval()
    ids, _, _ = random_batch(batch=4, seq_len=12)
    kept_idx = random_kept_idx(4, 12, k=5)
    ours = model.encode(ids, None, kept_idx)
    reference = _naive_token_drop_encode(model, ids, kept_idx)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    # and it really dropped something: the dense encoding differs
    assert not torch.allclose(ours, model.encode(ids, None, None))


def test_every_parameter_gets_a_gradient_with_dropping():
    model = make_model(dtype=torch.float32, dropout=0.1).train()
    ids, attention_mask, labels = random_batch(pad_from=10)
    kept_idx = random_kept_idx(3, 16, k=8)
    out = model(ids, attention_mask, labels, kept_idx)
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_kept_padding_stays_masked():
    model = make_model().eval()
    ids, attention_mask, _ = random_batch(batch=2, seq_len=10, pad_from=6)
    # Row 1 has 6 real tokens; keep 8 positions, so two [PAD] positions are kept.
    kept_idx = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 8]])
    other = ids.clone()
    other[1, 6:] = torch.tensor([11, 22, 33, 44])  # different content under the padding
    out_a = model.encode(ids, attention_mask, kept_idx)
    out_b = model.encode(other, attention_mask, kept_idx)
    torch.testing.assert_close(out_a[1, :6], out_b[1, :6], rtol=1e-12, atol=1e-12)
    # without the mask the padded content would leak into the real tokens
    out_c = model.encode(other, None, kept_idx)
    assert not torch.allclose(out_a[1, :6], out_c[1, :6])


# -- MLM head and loss --------------------------------------------------------------------


@pytest.mark.parametrize("width", [None, 9])  # None: the widest row; 9: a static width
def test_sparse_loss_matches_dense_logits(width):
    model = make_model().eval()
    ids, attention_mask, labels = random_batch(pad_from=13)
    out = model(ids, attention_mask, labels, prediction_width=width)
    logits = model.full_logits(ids, attention_mask)  # [B, S, V]
    predicted = labels != IGNORE_INDEX
    token_losses = F.cross_entropy(logits[predicted], labels[predicted], reduction="none")
    # the slots: row by row, each row's predictions in order, then padding slots
    assert out.valid.shape == (ids.shape[0] * (width or int(predicted.sum(1).max())),)
    torch.testing.assert_close(out.token_losses[out.valid], token_losses, rtol=1e-10, atol=1e-10)
    assert (out.token_losses[~out.valid] == 0).all()
    assert (out.target_ids[~out.valid] == IGNORE_INDEX).all()
    torch.testing.assert_close(out.loss, token_losses.mean(), rtol=1e-10, atol=1e-10)
    assert torch.equal(out.target_ids[out.valid], labels[predicted])
    assert out.num_predictions == int(predicted.sum())
    assert int(out.num_correct) == int((logits[predicted].argmax(-1) == labels[predicted]).sum())


def test_padding_slots_get_no_gradient():
    model = make_model(dtype=torch.float32, dropout=0.0).train()  # the same work but wider
    ids, attention_mask, labels = random_batch(pad_from=13)
    grads = []
    for width in (None, 12):
        model.zero_grad()
        model(ids, attention_mask, labels, prediction_width=width).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for narrow, wide in zip(*grads):
        torch.testing.assert_close(wide, narrow, rtol=1e-5, atol=1e-7)


def test_num_correct_counts_argmax_hits():
    model = make_model().eval()
    ids, attention_mask, labels = random_batch()
    logits = model.full_logits(ids, attention_mask)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :4] = logits[:, :4].argmax(-1)  # these four per row are right by construction
    labels[:, 4] = (logits[:, 4].argmax(-1) + 1) % VOCAB  # and this one is wrong
    out = model(ids, attention_mask, labels, prediction_width=8)  # padding slots never count
    assert int(out.num_correct) == 3 * 4
    assert out.num_predictions == 3 * 5


def test_prediction_positions_layout():
    labels = torch.full((3, 6), IGNORE_INDEX)
    labels[0, [4, 1]] = 7
    labels[2, [0, 2, 5]] = 9
    positions, valid = prediction_positions(labels)
    assert positions.shape == (3, 3)
    assert positions[0, :2].tolist() == [1, 4] and valid[0].tolist() == [True, True, False]
    assert valid[1].tolist() == [False, False, False]
    assert positions[2].tolist() == [0, 2, 5] and valid[2].all()
    flat = torch.arange(18).view(3, 6).gather(1, positions)[valid]
    assert flat.tolist() == (labels.view(-1) != IGNORE_INDEX).nonzero().squeeze(1).tolist()
    wide, wide_valid = prediction_positions(labels, width=5)  # static: the same, padded
    assert wide.shape == wide_valid.shape == (3, 5)
    assert torch.equal(wide[:, :3][valid], positions[valid]) and not wide_valid[:, 3:].any()


def test_no_predictions_gives_zero_loss():
    model = make_model(dtype=torch.float32).train()
    ids, attention_mask, _ = random_batch()
    for width in (None, 4):
        out = model(ids, attention_mask, torch.full_like(ids, IGNORE_INDEX), prediction_width=width)
        assert out.num_predictions == 0 and float(out.loss.detach()) == 0.0
        out.loss.backward()  # still differentiable


def test_decoder_is_tied_and_init_is_bert():
    model = BertForTokenDropPretraining(ModelConfig.from_preset("tiny", vocab_size=5000))
    assert model.mlm_head.decoder.weight is model.embeddings.word_embeddings.weight
    std = model.embeddings.word_embeddings.weight.std().item()
    assert 0.018 < std < 0.022
    layer = model.encoder.layers[0]
    assert torch.equal(layer.qkv.bias, torch.zeros_like(layer.qkv.bias))
    assert torch.equal(layer.attn_norm.weight, torch.ones_like(layer.attn_norm.weight))


def test_sequence_longer_than_positions_is_an_error():
    model = make_model()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.encode(torch.ones(1, 65, dtype=torch.long))


def test_full_logits_equal_hugging_face_bert():
    transformers = pytest.importorskip("transformers")
    model = make_model(dtype=torch.float32).eval()
    hf_config = transformers.BertConfig(**model.cfg.to_hf_bert_config())
    hf = transformers.BertForMaskedLM(hf_config).eval()
    result = hf.load_state_dict(hf_bert_state_dict(model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ids, attention_mask, _ = random_batch(pad_from=9)
    with torch.no_grad():
        ours = model.full_logits(ids, attention_mask)
        theirs = hf(input_ids=ids, attention_mask=attention_mask.long()).logits
    real = attention_mask
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-5)
