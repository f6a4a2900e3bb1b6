"""The few operations where PyTorch's own CPU kernels are unfused, and this project's.

Everything here has a plain-PyTorch reference that ``ModelConfig.kernels = "torch"``
selects instead, with the same semantics; the default, ``"auto"``, picks this module's
version where PyTorch has no fused kernel: float32 training on the CPU, in eager mode. On
a GPU, in evaluation, or under ``torch.compile`` (which fuses PyTorch's ops itself), both
settings run the same PyTorch ops.

- ``attention``: ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), except with
  attention dropout on the CPU. There SDPA has no fused kernel: it falls back to its math
  path, which materialises the [batch, heads, queries, keys] scores several times and
  draws the dropout mask one number at a time: 3.2x as slow as its fused kernel without
  dropout (152 against 48 ms per layer, forward and backward, [8, 4, 512, 64], 2 cores,
  ``benchmarks/bench_attention.py``). ``CpuDropoutAttention`` works through a few heads at
  a time so that the scores stay in the cache: 62 ms, 1.3x the kernel without dropout.
- ``dropout``: ``F.dropout``, whose CPU mask (``bernoulli_``) costs 4 ns an element.
- ``token_cross_entropy``: ``F.cross_entropy(reduction="none")``, whose backward allocates
  and fills two [N, vocab] tensors besides the gradient.

``"apex"`` runs PyTorch's ops like ``"torch"``, with NVIDIA apex's fused LayerNorm
(:mod:`pretrain.apex_support`; for GPUs).

Dropout masks come from ``keep_mask``: 16 random bits per element, four from each full
64-bit draw of the default CPU generator (5x faster than ``bernoulli_``, and seeded and
checkpointed like it). Its one difference from ``p``: the drop probability is rounded to a
multiple of 1/65536 (0.1 becomes 0.1000061), and kept values are scaled by 1 / (1 - that
probability), so the expectation is exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KERNELS = ("auto", "torch", "apex")  # apex: PyTorch's ops and apex's fused LayerNorm
_CHUNK_BYTES = 2 << 20  # attention scores worked on at a time: about one core's L2 cache


def layer_norm(size: int, eps: float, kernels: str = "auto") -> torch.nn.Module:
    """``nn.LayerNorm(size, eps)``, or apex's FusedLayerNorm with ``kernels="apex"``."""
    if kernels == "apex":
        from pretrain.apex_support import fused_layer_norm

        return fused_layer_norm(size, eps)
    return torch.nn.LayerNorm(size, eps=eps)


def _ours(x: torch.Tensor, kernels: str) -> bool:
    # Under torch.compile, PyTorch's ops: the compiler fuses them, and traces them whole.
    if torch.compiler.is_compiling():
        return False
    return kernels == "auto" and x.device.type == "cpu" and x.dtype == torch.float32


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    kernels: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with attention dropout ``dropout_p`` (pass 0 in eval).

    q [B, H, Q, D], k and v [B, H, K, D]; key_padding_mask [B, K] bool (True = real
    token) or None. Returns [B, H, Q, D].
    """
    if dropout_p > 0 and _ours(q, kernels):
        return CpuDropoutAttention.apply(q, k, v, key_padding_mask, dropout_p)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def dropout(x: torch.Tensor, p: float, training: bool, kernels: str = "auto") -> torch.Tensor:
    """``F.dropout(x, p, training)``."""
    if training and p > 0 and _ours(x, kernels):
        return CpuDropout.apply(x, p)
    return F.dropout(x, p, training)


def token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, kernels: str = "auto"
) -> torch.Tensor:
    """Per-token cross-entropy: logits [N, V] float32, targets [N] int64 -> [N]."""
    if _ours(logits, kernels):
        return TokenCrossEntropy.apply(logits, targets)
    return F.cross_entropy(logits, targets, reduction="none")


class Dropout(torch.nn.Dropout):
    """``nn.Dropout`` through :func:`dropout`."""

    def __init__(self, p: float, kernels: str = "auto") -> None:
        super().__init__(p)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.kernels)


def keep_mask(shape: tuple[int, ...], dropout_p: float) -> tuple[torch.Tensor, float]:
    """A dropout mask, uint8 ``shape`` (1 = kept), and the scale of the kept values.

    uint8, not bool: this PyTorch build converts and multiplies bool tensors 3-10x slower.
    """
    numel = math.prod(shape)
    drop_below = round(dropout_p * 65536)  # of 65536 equally likely 16-bit values
    words = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    bits = words.view(torch.int16)[:numel].view(shape)  # uniform over [-32768, 32767]
    keep = torch.ge(bits, drop_below - 32768).view(torch.uint8)
    return keep, 65536 / (65536 - drop_below)


class CpuDropout(torch.autograd.Function):
    """x * keep / (1 - p), saving the uint8 mask (as F.dropout saves its bool one)."""

    @staticmethod
    def forward(ctx, x, p):
        keep, scale = keep_mask(x.shape, p)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep.to(x.dtype).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.dtype).mul_(ctx.scale), None


class TokenCrossEntropy(torch.autograd.Function):
    """-log softmax(logits)[target] per row, keeping only the row's log-sum-exp.

    Backward writes softmax(logits) - onehot(target), times the incoming gradient, into
    one fresh [N, V] tensor.
    """

    @staticmethod
    def forward(ctx, logits, targets):
        lse = torch.logsumexp(logits, dim=-1)  # [N]
        losses = lse - logits.gather(1, targets[:, None]).squeeze(1)
        ctx.save_for_backward(logits, targets, lse)
        return losses

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.sub(logits, lse[:, None]).exp_().mul_(grad[:, None])
        rows = torch.arange(len(targets), device=targets.device)
        grad_logits[rows, targets] -= grad
        return grad_logits, None


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
        row_dot = (grad_out * out).sum(-1, keepdim=True)  # [B, H, Q, 1]
        grad_out = grad_out * ctx.keep_scale  # the 1/(1-p) of the dropout, on [.., D]
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
