"""Analytic FLOPs of one training step, dense or token-dropped.

Counted: matrix multiplications only, 2 FLOPs per multiply-add. Per sequence, a layer
whose queries cover q tokens and whose keys/values cover s tokens (H = hidden size,
I = intermediate size) costs, forward:

    query projection        2 q H^2
    key, value projections  4 s H^2
    scores Q K^T            2 q s H
    weighted sum A V        2 q s H
    output projection       2 q H^2
    feed-forward            4 q H I

    full layer:      q = s = S          boundary layer:  q = K, s = S
    kept layer:      q = s = K          (K = round(keep_ratio * S))
    last layer:      q = n, s = S       (training computes only the predicted positions)

with n = mask_fraction * S predicted positions, on which the sparse MLM head also runs:
2 n H^2 (transform) + 2 n H V (decoder). Embedding lookups, LayerNorm, GELU, softmax,
dropout and the loss are not matmuls and are ignored. Training = 3 x forward (the
backward pass computes gradients for inputs and weights: twice the forward matmuls).
"""

from __future__ import annotations

from typing import NamedTuple

from pretrain.model import LAYER_ROLES, ModelConfig, layer_plan, num_kept_tokens

TRAIN_FACTOR = 3  # forward + backward (2x forward)


class StageFlops(NamedTuple):
    name: str  # "embeddings", "layer.<i>" or "mlm_head"
    role: str  # "embeddings", "full", "boundary", "kept", "output" (the last layer) or "head"
    train_flops: float  # forward + backward of one step


def layer_forward_flops(cfg: ModelConfig, num_queries: float, num_keys: float) -> float:
    """Forward matmul FLOPs of one encoder layer for one sequence (formula in the module doc)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    projections = 2 * num_queries * h * h + 4 * num_keys * h * h + 2 * num_queries * h * h
    attention = 4 * num_queries * num_keys * h
    feed_forward = 4 * num_queries * h * i
    return float(projections + attention + feed_forward)


def mlm_head_forward_flops(cfg: ModelConfig, num_predicted: float) -> float:
    """Forward FLOPs of the sparse MLM head on ``num_predicted`` positions of one sequence."""
    h = cfg.hidden_size
    return float(num_predicted * (2 * h * h + 2 * h * cfg.vocab_size))


def train_step_breakdown(
    cfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    keep_ratio: float = 1.0,
    mask_fraction: float = 0.15,
) -> list[StageFlops]:
    """Training FLOPs per piece of the model, in forward order (for pipeline stage balancing).

    keep_ratio 1.0 is the dense model.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    if not 0.0 <= mask_fraction <= 1.0:
        raise ValueError(f"mask_fraction must be in [0, 1], got {mask_fraction}")
    kept = num_kept_tokens(seq_len, keep_ratio)
    predicted = mask_fraction * seq_len
    tokens_seen = {
        "full": (seq_len, seq_len),
        "boundary": (kept, seq_len),
        "kept": (kept, kept),
        "output": (predicted, seq_len),
    }
    scale = TRAIN_FACTOR * batch_size
    stages = [StageFlops("embeddings", "embeddings", 0.0)]
    for step in layer_plan(cfg):
        if step.role not in LAYER_ROLES:
            continue
        num_queries, num_keys = tokens_seen[step.role]
        stages.append(
            StageFlops(
                f"layer.{step.layer}",
                step.role,
                scale * layer_forward_flops(cfg, num_queries, num_keys),
            )
        )
    head = mlm_head_forward_flops(cfg, predicted)
    stages.append(StageFlops("mlm_head", "head", scale * head))
    return stages


def train_step_flops(
    cfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    keep_ratio: float = 1.0,
    mask_fraction: float = 0.15,
) -> float:
    """Matmul FLOPs of one training step (forward + backward) on a [batch_size, seq_len] batch."""
    return sum(
        s.train_flops
        for s in train_step_breakdown(cfg, batch_size, seq_len, keep_ratio, mask_fraction)
    )


def flops_ratio(
    cfg: ModelConfig, seq_len: int, keep_ratio: float, mask_fraction: float = 0.15
) -> float:
    """Token-dropped over dense training FLOPs (independent of the batch size)."""
    dropped = train_step_flops(cfg, 1, seq_len, keep_ratio, mask_fraction)
    return dropped / train_step_flops(cfg, 1, seq_len, 1.0, mask_fraction)


__all__ = [
    "StageFlops",
    "flops_ratio",
    "layer_forward_flops",
    "mlm_head_forward_flops",
    "train_step_breakdown",
    "train_step_flops",
]
