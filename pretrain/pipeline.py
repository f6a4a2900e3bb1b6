"""The token-dropped encoder as a DeepSpeed ``PipelineModule``.

DeepSpeed's own token dropping (random-LTD) cannot run with pipeline parallelism; this
can, because token dropping here is two index operations whose indices travel between
stages as int64 tensors. The layer list, with the activations each layer passes on:

    WordEmbeddingPipe (tied)       ids            -> A = (hidden [B,S,H], mask [B,S], kept_idx [B,K], out_idx [B,P])
    EmbeddingRestPipe              A -> A           positions, LayerNorm, dropout
    FullLayerPipe  x (L/2 - 1)     A -> A
    BoundaryLayerPipe              A -> D = (hidden [B,S,H], kept [B,K,H], mask, kept_idx, out_idx)
    KeptLayerPipe  x (L/2 - 1)     D -> D
    MergePipe                      D -> A           dropped tokens rejoin (scatter)
    OutputLayerPipe                A -> [B,P,H]     the last layer, queries at the predicted positions
    MlmTransformPipe               [B,P,H] -> [B,P,H]
    WordEmbeddingPipe (tied)       [B,P,H] -> logits [B,P,V] (decoder = word embeddings)
    DecoderBiasPipe                + bias; the loss function runs on the last stage

Shapes are static, as pipeline stages need: K = round(keep_ratio * S), and P is the most
positions masking can predict in a row, the rows padded with label -100. Integer tensors
(mask, indices) get no gradient; every float tensor passed between stages does.

Weights come from one :class:`BertForTokenDropPretraining` built with the run's seed on
every rank, so a pipeline run starts from exactly the weights of a data-parallel run.
Stages are balanced by the analytic FLOPs of each layer (:mod:`pretrain.flops`), not by
layer count: the kept-token layers are cheaper than the full ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.flops import train_step_breakdown
from pretrain.model import (
    IGNORE_INDEX,
    BertForTokenDropPretraining,
    ModelConfig,
    gather_tokens,
    layer_split,
    mlm_loss,
    prediction_positions,
    scatter_tokens,
)


def max_predictions(seq_len: int, mask_prob: float = 0.15) -> int:
    """P: the most positions masking predicts in one row (a row has at most seq_len - 1
    maskable positions, [CLS] being special; masking predicts round(mask_prob * n))."""
    return max(1, math.floor((seq_len - 1) * mask_prob + 0.5))


def pipe_batch(input_ids, attention_mask, labels, kept_idx, width: int):
    """The model's inputs as pipeline tensors: ((ids, mask, kept_idx, out_idx), targets).

    out_idx [B, P] are the predicted positions padded to the static width P; targets [B, P]
    their label ids, -100 where padded.
    """
    positions, valid = prediction_positions(labels)  # [B, p] with p <= width
    if positions.shape[1] > width:
        raise ValueError(f"{positions.shape[1]} predicted positions in a row exceed P={width}")
    pad = width - positions.shape[1]
    out_idx = F.pad(positions, (0, pad))
    valid = F.pad(valid, (0, pad))
    targets = torch.where(valid, labels.gather(1, out_idx), IGNORE_INDEX)
    return (input_ids, attention_mask.to(torch.int64), kept_idx, out_idx), targets


def _mask(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool()


class WordEmbeddingPipe(nn.Module):
    """The word embeddings: the first layer, and (tied) the MLM decoder of the last stage."""

    def __init__(self, word_embeddings: nn.Embedding):
        super().__init__()
        self.word_embeddings = word_embeddings

    def forward(self, inputs):
        input_ids, mask, kept_idx, out_idx = inputs
        return self.word_embeddings(input_ids), mask, kept_idx, out_idx

    @staticmethod
    def decode(module: WordEmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, module.word_embeddings.weight)  # [B, P, V]


class EmbeddingRestPipe(nn.Module):
    """Position and token-type embeddings, LayerNorm and dropout (see model.Embeddings)."""

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.position_embeddings = embeddings.position_embeddings
        self.token_type_embeddings = embeddings.token_type_embeddings
        self.norm = embeddings.norm
        self.dropout = embeddings.dropout

    def forward(self, inputs):
        words, mask, kept_idx, out_idx = inputs
        seq_len = words.shape[1]
        position_and_type = (
            self.position_embeddings.weight[:seq_len] + self.token_type_embeddings.weight[0]
        )
        return self.dropout(self.norm(words + position_and_type)), mask, kept_idx, out_idx


class FullLayerPipe(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, inputs):
        hidden, mask, kept_idx, out_idx = inputs
        return self.layer(hidden, key_padding_mask=_mask(mask)), mask, kept_idx, out_idx


class BoundaryLayerPipe(FullLayerPipe):
    """Kept tokens query all tokens; the full hidden state travels on for the merge."""

    def forward(self, inputs):
        hidden, mask, kept_idx, out_idx = inputs
        kept = self.layer(gather_tokens(hidden, kept_idx), hidden, _mask(mask))  # [B, K, H]
        return hidden, kept, mask, kept_idx, out_idx


class KeptLayerPipe(FullLayerPipe):
    def forward(self, inputs):
        hidden, kept, mask, kept_idx, out_idx = inputs
        kept_mask = gather_tokens(_mask(mask), kept_idx)  # a kept [PAD] stays masked
        return hidden, self.layer(kept, key_padding_mask=kept_mask), mask, kept_idx, out_idx


class MergePipe(nn.Module):
    """Dropped tokens rejoin with the state they had entering the boundary layer."""

    def forward(self, inputs):
        hidden, kept, mask, kept_idx, out_idx = inputs
        return scatter_tokens(hidden, kept, kept_idx), mask, kept_idx, out_idx


class OutputLayerPipe(FullLayerPipe):
    """The last layer, computing only the predicted positions (their queries attend to all)."""

    def forward(self, inputs):
        hidden, mask, kept_idx, out_idx = inputs
        return self.layer(gather_tokens(hidden, out_idx), hidden, _mask(mask))  # [B, P, H]


class MlmTransformPipe(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.dense, self.norm = head.dense, head.norm

    def forward(self, hidden):
        return self.norm(F.gelu(self.dense(hidden)))


class DecoderBiasPipe(nn.Module):
    def __init__(self, decoder: nn.Linear):
        super().__init__()
        self.bias = decoder.bias

    def forward(self, logits):
        return logits + self.bias


class PipeLoss:
    """The loss function of the last stage: mean cross-entropy over the predicted positions.

    It also keeps the step's statistics and feeds the importance table (the last stage is
    the only one that sees the losses); ``training`` off during evaluation.
    """

    def __init__(self, table, kernels: str = "auto"):
        self.table = table
        self.kernels = kernels
        self.training = True
        self.reset()

    def reset(self) -> None:
        self.loss_sum = self.predictions = self.correct = 0.0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = targets != IGNORE_INDEX  # [B, P]
        out = mlm_loss(logits[valid], targets[valid], self.kernels)  # logits [N, V], targets [N]
        self.loss_sum += float(out.token_losses.sum())
        self.predictions += out.num_predictions
        self.correct += float(out.num_correct)
        if self.training:
            self.table.accumulate(out.target_ids, out.token_losses)
        return out.loss


def layer_costs(cfg: ModelConfig, seq_len: int, keep_ratio: float) -> list[float]:
    """Training FLOPs of each entry of the layer list (same order), for stage balancing."""
    flops = {s.name: s.train_flops for s in train_step_breakdown(cfg, 1, seq_len, keep_ratio)}
    split = layer_split(cfg)
    costs = [0.0, 0.0]  # word embeddings, the rest of the embeddings
    for i in range(cfg.num_layers):
        costs.append(flops[f"layer.{i}"])
        if i == split.last_dropped_layer:
            costs.append(0.0)  # merge
    head = flops["mlm_head"]
    return costs + [head * 0.05, head * 0.9, head * 0.05]  # transform, decoder, bias


def build_pipeline(
    cfg: ModelConfig, num_stages: int, seq_len: int, keep_ratio: float, loss, seed: int
):
    """A ``PipelineModule`` of the token-dropped encoder (see the module docstring).

    Returns (module, stage shares): each stage's fraction of the step's FLOPs.
    """
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime import utils as ds_utils

    torch.manual_seed(seed)
    full = BertForTokenDropPretraining(cfg)  # the same initial weights as a data-parallel run
    split = layer_split(cfg)
    layers = full.encoder.layers
    specs = [
        TiedLayerSpec(
            "embed",
            WordEmbeddingPipe,
            full.embeddings.word_embeddings,
            tied_weight_attr="word_embeddings.weight",
        ),
        LayerSpec(EmbeddingRestPipe, full.embeddings),
    ]
    for i in range(cfg.num_layers - 1):
        role = split.role(i)
        kind = {"full": FullLayerPipe, "boundary": BoundaryLayerPipe, "kept": KeptLayerPipe}[role]
        specs.append(LayerSpec(kind, layers[i]))
        if i == split.last_dropped_layer:
            specs.append(LayerSpec(MergePipe))
    specs += [
        LayerSpec(OutputLayerPipe, layers[cfg.num_layers - 1]),
        LayerSpec(MlmTransformPipe, full.mlm_head),
        TiedLayerSpec(
            "embed",
            WordEmbeddingPipe,
            full.embeddings.word_embeddings,
            forward_fn=WordEmbeddingPipe.decode,
            tied_weight_attr="word_embeddings.weight",
        ),
        LayerSpec(DecoderBiasPipe, full.mlm_head.decoder),
    ]
    costs = layer_costs(cfg, seq_len, keep_ratio)
    assert len(costs) == len(specs), (len(costs), len(specs))
    parts = ds_utils.partition_balanced(weights=costs, num_parts=num_stages)
    shares = [sum(costs[parts[s] : parts[s + 1]]) / sum(costs) for s in range(num_stages)]

    class FlopsBalancedPipeline(PipelineModule):
        def _partition_layers(self, method="uniform"):
            self.parts = parts
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=parts[stage], stop=parts[stage + 1])

    module = FlopsBalancedPipeline(
        layers=specs, num_stages=num_stages, loss_fn=loss, partition_method="flops"
    )
    return module, parts, shares
