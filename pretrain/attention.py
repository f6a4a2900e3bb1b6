"""Scaled dot-product attention for the encoder layers.

``attention()`` is ``torch.nn.functional.scaled_dot_product_attention`` (SDPA) with a key
padding mask, except in one case: attention dropout while training in float32 on the CPU.
There PyTorch has no fused SDPA kernel: it falls back to its unfused math path, which
materialises the whole [batch, heads, queries, keys] score tensor several times, draws the
dropout mask one number at a time, and takes about 3.4x as long as the fused kernel without
dropout (136 ms against 40 ms per layer, forward and backward, at [8, 4, 512, 64] on 2
cores; see docs/benchmarks.md). For that case this module has its own kernel, with the
same semantics as SDPA's math path:

    probs = softmax(q k^T / sqrt(d) + padding bias)        [B, H, Q, K]
    out   = (probs * keep / (1 - p)) v                      keep ~ Bernoulli(1 - p)

It works through the (batch, head) slices a few at a time, so that each slice's scores stay
in the CPU cache between the matmul, the softmax, the dropout and the next matmul, and it
draws the dropout mask 16 random bits per element from full 64-bit draws (5x faster than
``bernoulli_``). Its only difference from ``dropout_p``: p is rounded to a multiple of
1/65536 (0.1 becomes 0.1000061), and the kept values are scaled by 1 / (1 - that p), so
the expectation is exact. ``ModelConfig.attention_kernel = "sdpa"`` turns it off.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_CHUNK_BYTES = 2 << 20  # scores worked on at a time: about one core's L2 cache


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    kernel: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with attention dropout ``dropout_p`` (pass 0 in eval).

    q [B, H, Q, D], k and v [B, H, K, D]; key_padding_mask [B, K] bool (True = real
    token) or None. Returns [B, H, Q, D]. ``kernel``: ``"auto"`` (SDPA, or this module's
    kernel for float32 CPU attention dropout) or ``"sdpa"`` (always SDPA).
    """
    if kernel == "auto" and dropout_p > 0 and q.device.type == "cpu" and q.dtype == torch.float32:
        return CpuDropoutAttention.apply(q, k, v, key_padding_mask, dropout_p)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def keep_mask(shape: tuple[int, ...], dropout_p: float) -> tuple[torch.Tensor, float]:
    """A dropout mask, uint8 ``shape`` (1 = kept), drawn from the default CPU generator,
    and the scale of the kept values. Each element is dropped with probability
    round(p * 65536) / 65536: 16 random bits per element, four from each 64-bit draw.
    uint8, not bool: this PyTorch build converts and multiplies bool tensors 5-10x slower."""
    numel = math.prod(shape)
    drop_below = round(dropout_p * 65536)  # of 65536 equally likely 16-bit values
    words = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    bits = words.view(torch.int16)[:numel].view(shape)  # uniform over [-32768, 32767]
    keep = torch.ge(bits, drop_below - 32768).view(torch.uint8)
    return keep, 65536 / (65536 - drop_below)


class CpuDropoutAttention(torch.autograd.Function):
    """Attention with dropout, a cache-sized group of one sequence's heads at a time.

    Works on strided views of q, k and v (no copies), saves what SDPA's math path saves
    (the probabilities and the dropout mask) and computes the gradients group by group
    with the softmax identity dS = P * (dP - rowsum(dO * O)), dP being the gradient of the
    probabilities before dropout. The 1/sqrt(d) and 1/(1-p) factors are applied to the
    [.., D]-sized operands rather than to the [.., K]-sized scores.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, dropout_p):
        batch, heads, num_q, head_dim = q.shape
        num_k = k.shape[2]
        q = q * (1.0 / math.sqrt(head_dim))
        bias = None
        if key_padding_mask is not None:
            # [batch, 1, K]: 0 for real keys, the lowest float for padding. A finite value
            # keeps a row with no real key finite (uniform) where -inf would give NaN.
            bias = torch.zeros(batch, 1, num_k, dtype=q.dtype)
            bias.masked_fill_(~key_padding_mask[:, None, :], torch.finfo(q.dtype).min)

        keep, keep_scale = keep_mask((batch, heads, num_q, num_k), dropout_p)
        probs = torch.empty(batch, heads, num_q, num_k, dtype=q.dtype)
        out = torch.empty(batch, heads, num_q, head_dim, dtype=q.dtype)
        group = max(1, min(heads, _CHUNK_BYTES // (num_q * num_k * q.element_size())))
        for b in range(batch):
            for h in range(0, heads, group):
                hs = slice(h, h + group)
                p = probs[b, hs]  # [g, Q, K]
                torch.bmm(q[b, hs], k[b, hs].transpose(1, 2), out=p)
                if bias is not None:
                    p.add_(bias[b])
                torch.softmax(p, dim=-1, out=p)
                torch.bmm(p * keep[b, hs].to(q.dtype), v[b, hs], out=out[b, hs])
        out.mul_(keep_scale)

        ctx.save_for_backward(q, k, v, probs, keep, out)
        ctx.keep_scale, ctx.group = keep_scale, group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs, keep, out = ctx.saved_tensors  # q already scaled by 1/sqrt(d)
        batch, heads, _, head_dim = q.shape
        grad_out = grad_out * ctx.keep_scale  # the 1/(1-p) of the dropout, on [.., D]
        row_dot = (grad_out * out).sum(-1, keepdim=True) / ctx.keep_scale  # [B, H, Q, 1]
        grad_q, grad_k, grad_v = (torch.empty(t.shape, dtype=t.dtype) for t in (q, k, v))
        for b in range(batch):
            for h in range(0, heads, ctx.group):
                hs = slice(h, h + ctx.group)
                p, g = probs[b, hs], grad_out[b, hs]
                kept_f = keep[b, hs].to(q.dtype)
                torch.bmm((p * kept_f).transpose(1, 2), g, out=grad_v[b, hs])
                grad_p = torch.bmm(g, v[b, hs].transpose(1, 2))  # [g, Q, K]
                grad_s = grad_p.mul_(kept_f).sub_(row_dot[b, hs]).mul_(p)
                torch.bmm(grad_s, k[b, hs], out=grad_q[b, hs])
                torch.bmm(grad_s.transpose(1, 2), q[b, hs], out=grad_k[b, hs])
        grad_q.mul_(1.0 / math.sqrt(head_dim))  # dK needs none: it used the scaled q
        return grad_q, grad_k, grad_v, None, None
