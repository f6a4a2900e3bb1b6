"""pretrain/kernels.py: the CPU kernels equal their plain-PyTorch references."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.kernels import attention, dropout, keep_mask, token_cross_entropy
from pretrain.model import BertForTokenDropPretraining, ModelConfig


def qkv(batch=3, heads=2, num_q=37, num_k=53, head_dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, num_q, head_dim, generator=gen).requires_grad_()
    k = torch.randn(batch, heads, num_k, head_dim, generator=gen).requires_grad_()
    v = torch.randn(batch, heads, num_k, head_dim, generator=gen).requires_grad_()
    grad = torch.randn(batch, heads, num_q, head_dim, generator=gen)
    return q, k, v, grad


def padding(batch, num_k):
    mask = torch.ones(batch, num_k, dtype=torch.bool)
    mask[1, num_k - 13 :] = False
    mask[2, 5:9] = False
    return mask


@pytest.mark.parametrize(
    "num_q", [37, 53]
)  # fewer queries than keys (the boundary layer), and equal
@pytest.mark.parametrize("padded", [False, True])
def test_dropout_attention_matches_reference_with_the_same_mask(num_q, padded):
    q, k, v, grad = qkv(num_q=num_q)
    mask = padding(3, 53) if padded else None
    torch.manual_seed(5)
    out = attention(q, k, v, mask, 0.1)
    out.backward(grad)
    ours = [out.detach(), q.grad, k.grad, v.grad]
    q.grad = k.grad = v.grad = None

    torch.manual_seed(5)  # the same draws: the kernel takes its mask from keep_mask
    keep, scale = keep_mask((3, 2, num_q, 53), 0.1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(16)
    if padded:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    reference = (torch.softmax(scores, -1) * keep * scale) @ v
    reference.backward(grad)
    for got, want in zip(ours, [reference.detach(), q.grad, k.grad, v.grad]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert 0 < (keep == 0).sum() < keep.numel()


def test_attention_without_dropout_is_sdpa():
    q, k, v, _ = qkv()
    mask = padding(3, 53)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    assert torch.equal(attention(q, k, v, mask, 0.0), want)
    torch.manual_seed(0)
    sdpa_dropout = attention(q, k, v, mask, 0.1, kernels="torch")
    torch.manual_seed(0)
    assert torch.equal(
        sdpa_dropout,
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], dropout_p=0.1),
    )


def test_keep_mask_drops_p_of_every_lane_and_keeps_the_expectation():
    torch.manual_seed(0)
    keep, scale = keep_mask((1 << 20,), 0.1)
    drop_p = round(0.1 * 65536) / 65536
    assert scale == pytest.approx(1 / (1 - drop_p))
    assert keep.dtype == torch.uint8 and set(keep.unique().tolist()) == {0, 1}
    # four 16-bit lanes per 64-bit draw: each must be uniform (a 63-bit draw would bias one)
    lanes = 1.0 - keep.view(-1, 4).double().mean(0)
    sigma = math.sqrt(drop_p * (1 - drop_p) / (len(keep) / 4))
    assert (lanes - drop_p).abs().max() < 5 * sigma, lanes
    assert (keep.double() * scale).mean() == pytest.approx(1.0, abs=5 * sigma)


def test_dropout_applies_its_mask_to_values_and_gradients():
    x = torch.randn(64, 96).requires_grad_()
    torch.manual_seed(3)
    y = dropout(x, 0.25, training=True)
    torch.manual_seed(3)
    keep, scale = keep_mask(x.shape, 0.25)
    torch.testing.assert_close(y, x * keep * scale)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, keep.float() * scale)
    assert torch.equal(dropout(x, 0.25, training=False), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_cross_entropy_matches_pytorch(dtype):
    gen = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(50, 97, generator=gen, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, 97, (50,), generator=gen)
    targets[:5] = 7  # repeated targets
    upstream = torch.rand(50, generator=gen, dtype=dtype)
    ours = token_cross_entropy(logits, targets)
    (ours * upstream).sum().backward()
    ours_grad, logits.grad = logits.grad, None
    want = F.cross_entropy(logits, targets, reduction="none")
    (want * upstream).sum().backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours, want, rtol=tol, atol=tol)
    torch.testing.assert_close(ours_grad, logits.grad, rtol=tol, atol=tol)


def test_model_kernels_auto_and_torch_agree_without_dropout():
    cfg = dict(vocab_size=97, max_position_embeddings=64, dropout=0.0)
    torch.manual_seed(0)
    ours = BertForTokenDropPretraining(ModelConfig.from_preset("tiny", **cfg)).train()
    reference = BertForTokenDropPretraining(
        ModelConfig.from_preset("tiny", kernels="torch", **cfg)
    ).train()
    reference.load_state_dict(ours.state_dict())
    ids = torch.randint(5, 97, (2, 32))
    labels = torch.where(torch.rand(2, 32) < 0.3, ids, -100)
    labels[:, 3] = ids[:, 3]
    a, b = ours(ids, None, labels), reference(ids, None, labels)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
