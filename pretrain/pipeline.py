"""The token-dropped encoder as a DeepSpeed ``PipelineModule``, and its step runner.

DeepSpeed's own token dropping (random-LTD) cannot run with pipeline parallelism; this
can, because token dropping here is two index operations whose indices travel between
stages as int64 tensors. The pipeline's layers are the steps of
:func:`pretrain.model.layer_plan`, one wrapper each, calling the model's own pieces;
what each step passes on:

    word_embeddings (tied)   ids -> A = (hidden [B,S,H], mask [B,S], kept_idx [B,K], out_idx [B,P])
    embeddings, full         A -> A
    boundary, kept           -> D = (hidden [B,S,H], kept [B,K,H], mask, kept_idx, out_idx)
    merge                    D -> A           dropped tokens rejoin (scatter)
    output                   A -> [B,P,H]     the last layer, queries at the predicted positions
    mlm_transform            [B,P,H] -> [B,P,H]
    decoder (tied)           [B,P,H] -> logits [B,P,V] (decoder = word embeddings)
    decoder_bias             + bias; the loss function runs on the last stage

Shapes are static, as pipeline stages need (and as the data-parallel step has them too):
K = round(keep_ratio * S), and P is the most positions masking can predict in a row, the
rows padded with label -100. A step without dropping passes kept_idx = every position
(K = S): the pipeline's tensor form of the trainer's None. Integer tensors (mask, indices) get no gradient; every float tensor
passed between stages does.

Weights come from one :class:`BertForTokenDropPretraining` built with the run's seed on
every rank, so a pipeline run starts from exactly the weights of a data-parallel run.
Stages are balanced by the analytic FLOPs of each step (:mod:`pretrain.flops`), not by
layer count: the kept-token layers are cheaper than the full ones.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.apex_support import client_optimizer
from pretrain.data import Batch
from pretrain.flops import train_step_breakdown
from pretrain.importance import STRATEGIES
from pretrain.masking import IGNORE_INDEX, max_predictions
from pretrain.model import (
    LAYER_ROLES,
    BertForTokenDropPretraining,
    Embeddings,
    LayerState,
    MlmHead,
    ModelConfig,
    apply_layer,
    apply_output_layer,
    gather_tokens,
    layer_plan,
    mlm_loss,
    prediction_positions,
)


def pipe_batch(input_ids, attention_mask, labels, kept_idx, width: int):
    """The model's inputs as pipeline tensors: ((ids, mask, kept_idx, out_idx), targets).

    out_idx [B, P] are the predicted positions padded to the static width P
    (:func:`pretrain.masking.max_predictions`); targets [B, P] their label ids, -100 where
    padded.
    """
    out_idx, valid = prediction_positions(labels, width)  # [B, P]
    targets = torch.where(valid, labels.gather(1, out_idx), IGNORE_INDEX)
    return (input_ids, attention_mask.to(torch.int64), kept_idx, out_idx), targets


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
    """The embeddings without the word lookup: the pieces of model.Embeddings it uses."""

    add_positions = Embeddings.add_positions  # the model's own arithmetic, on these pieces

    def __init__(self, position_embeddings, token_type_embeddings, norm, dropout):
        super().__init__()
        self.position_embeddings = position_embeddings
        self.token_type_embeddings = token_type_embeddings
        self.norm = norm
        self.dropout = dropout

    def forward(self, inputs):
        words, mask, kept_idx, out_idx = inputs
        return self.add_positions(words), mask, kept_idx, out_idx


class EncoderStepPipe(nn.Module):
    """One encoder step of the plan (a layer role, or the merge) on pipeline tensors."""

    def __init__(self, role: str, layer: nn.Module | None = None):
        super().__init__()
        self.role = role
        self.layer = layer

    def forward(self, inputs):
        if len(inputs) == 4:
            hidden, mask, kept_idx, out_idx = inputs
            kept = kept_mask = None
        else:
            hidden, kept, mask, kept_idx, out_idx = inputs
            kept_mask = gather_tokens(mask.bool(), kept_idx)  # a kept [PAD] stays masked
        state = LayerState(hidden, mask.bool(), kept_idx, kept, kept_mask)
        if self.role == "output":
            return apply_output_layer(self.layer, state, out_idx)  # [B, P, H]
        state = apply_layer(self.role, self.layer, state)
        if state.kept is None:
            return state.hidden, mask, kept_idx, out_idx
        return state.hidden, state.kept, mask, kept_idx, out_idx


class MlmTransformPipe(nn.Module):
    transform = MlmHead.transform  # the model's own arithmetic, on these pieces

    def __init__(self, dense: nn.Linear, norm: nn.LayerNorm):
        super().__init__()
        self.dense, self.norm = dense, norm

    def forward(self, hidden):
        return self.transform(hidden)


class DecoderBiasPipe(nn.Module):
    def __init__(self, bias: nn.Parameter):
        super().__init__()
        self.bias = bias

    def forward(self, logits):
        return logits + self.bias


class PipeLoss:
    """The loss function of the last stage: mean cross-entropy over the predicted positions.

    Each micro-batch's output goes to ``record`` (the trainer's: the step's sums and the
    importance table); only the last stage sees the losses.
    """

    def __init__(self, record, kernels: str = "auto"):
        self.record = record
        self.kernels = kernels

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # every slot, padding included (target -100, no loss): static shapes, no host read
        out = mlm_loss(logits.flatten(0, 1), targets.flatten(), self.kernels)  # [B*P, V], [B*P]
        self.record(out)
        return out.loss


_HEAD_SHARES = {"mlm_transform": 0.05, "decoder": 0.9, "decoder_bias": 0.05}


def layer_costs(cfg: ModelConfig, seq_len: int, keep_ratio: float) -> list[float]:
    """Training FLOPs of each step of the layer plan (same order), for stage balancing."""
    flops = {s.name: s.train_flops for s in train_step_breakdown(cfg, 1, seq_len, keep_ratio)}
    head = flops["mlm_head"]
    return [
        flops[f"layer.{step.layer}"]
        if step.role in LAYER_ROLES
        else head * _HEAD_SHARES.get(step.role, 0.0)
        for step in layer_plan(cfg)
    ]


def pipeline_parameter_names(cfg: ModelConfig) -> list[dict[str, str]]:
    """For each pipeline layer (DeepSpeed's ``layer_<i>-model_states.pt``), how its
    parameter prefixes map to :class:`BertForTokenDropPretraining` names (the export)."""
    return [dict(step.modules) for step in layer_plan(cfg)]


def build_pipeline(
    full: BertForTokenDropPretraining, num_stages: int, seq_len: int, keep_ratio: float, loss
):
    """A ``PipelineModule`` of the token-dropped encoder (see the module docstring), made of
    the modules of ``full``, which holds the initial weights.

    Returns (module, stage boundaries, stage shares): each stage's fraction of the FLOPs.
    """
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime import utils as ds_utils

    cfg = full.cfg
    wrappers = {
        "embeddings": EmbeddingRestPipe,
        "mlm_transform": MlmTransformPipe,
        "decoder_bias": DecoderBiasPipe,
    }
    specs = []
    for step in layer_plan(cfg):
        pieces = {attr: operator.attrgetter(path)(full) for attr, path in step.modules}
        if step.role in ("word_embeddings", "decoder"):
            specs.append(
                TiedLayerSpec(
                    "embed",
                    WordEmbeddingPipe,
                    **pieces,
                    forward_fn=WordEmbeddingPipe.decode if step.role == "decoder" else None,
                    tied_weight_attr="word_embeddings.weight",
                )
            )
        elif step.role in (*LAYER_ROLES, "merge"):
            specs.append(LayerSpec(EncoderStepPipe, step.role, **pieces))
        else:
            specs.append(LayerSpec(wrappers[step.role], **pieces))
    costs = layer_costs(cfg, seq_len, keep_ratio)
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


_UNSET = object()


class PipelineRunner:
    """Pipeline parallelism (ZeRO 0-1): DeepSpeed's pipeline engine runs the micro-batches
    through the stages; the first stage selects tokens, the last one computes the loss."""

    def __init__(self, resolved, select, record, weights: dict | None):
        import deepspeed

        from pretrain import distributed
        from pretrain.trainer import initial_model

        run = resolved.run
        self.select = select
        self.device = distributed.device()
        self.prediction_width = max_predictions(resolved.manifest.seq_len)  # P, static
        keep_ratio = run.keep_ratio if STRATEGIES[run.token_drop].drops else 1.0
        module, parts, self.stage_shares = build_pipeline(
            initial_model(resolved, weights),  # the same weights as a data-parallel run
            run.pipeline_stages,
            resolved.manifest.seq_len,
            keep_ratio,
            PipeLoss(record, resolved.model.kernels),
        )
        self.stage_layers = [(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
        parameters = [p for p in module.parameters() if p.requires_grad]
        optimizer, ds_config = client_optimizer(resolved.deepspeed, parameters)
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, model_parameters=parameters, optimizer=optimizer, config=ds_config
        )
        self.dp_rank = self.engine.grid.get_data_parallel_rank()
        self.dp_size = self.engine.dp_world_size
        self._kept_tokens = _UNSET  # K of the activations DeepSpeed has allocated

    def describe(self) -> str | None:
        shares = ", ".join(
            f"stage {i}: layers {a}-{b - 1}, {share:.0%} of the FLOPs"
            for i, ((a, b), share) in enumerate(zip(self.stage_layers, self.stage_shares))
        )
        return f"pipeline of {len(self.stage_shares)} stages balanced by FLOPs: {shares}"

    def _pipe_kept(self, kept_idx, input_ids: torch.Tensor, kept_tokens: int | None):
        """kept_idx in pipeline form: as selected on the first stage; on the others only its
        shape matters; without dropping, every position."""
        if kept_idx is not None:
            return kept_idx
        batch, seq_len = input_ids.shape
        if kept_tokens is not None:
            return torch.zeros(batch, kept_tokens, dtype=torch.int64, device=input_ids.device)
        return torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len).contiguous()

    def _items(self, batches: Iterable[Batch], kept_tokens: int | None, select: bool):
        for micro, batch in enumerate(batches):
            labels = batch.labels.to(self.device)
            input_ids = batch.input_ids.to(self.device)
            kept_idx = self.select(micro, input_ids, labels, kept_tokens) if select else None
            yield pipe_batch(
                input_ids,
                batch.attention_mask.to(self.device),
                labels,
                self._pipe_kept(kept_idx, input_ids, kept_tokens),
                self.prediction_width,
            )

    def train_step(self, batches: Iterable[Batch], kept_tokens: int | None) -> None:
        engine = self.engine
        first, last = engine.is_first_stage(), engine.is_last_stage()
        if self._kept_tokens is not _UNSET and kept_tokens != self._kept_tokens:
            engine.reset_activation_shape()  # K changes: the full-sequence phase begins
        self._kept_tokens = kept_tokens
        items = self._items(batches, kept_tokens, select=first) if first or last else None
        engine.train_batch(data_iter=items)

    def evaluate(self, batches: list[Batch]) -> None:
        if not batches:  # the same count on every stage: the schedule depends on it
            return
        engine = self.engine
        engine.reset_activation_shape()  # the full sequence: K = S
        first, last = engine.is_first_stage(), engine.is_last_stage()
        items = self._items(batches, None, select=False) if first or last else None
        engine.eval_batch(items, num_micro_batches=len(batches))
        engine.reset_activation_shape()
        self._kept_tokens = _UNSET
