"""BERT with token dropping (Hou et al., ACL 2022, arXiv 2203.13240), in plain PyTorch.

Read top to bottom: the config, the layer split, the two index operations that *are*
token dropping, the embeddings, one post-LN encoder layer, the token-dropping encoder,
the sparse MLM head, and the pretraining model that ties them together.

Token dropping (docs/architecture.md, "Token dropping"), with L layers and the default split:

    layers 0 .. L/2-2      full sequence                          [batch, seq, hidden]
    layer  L/2-1           queries: kept tokens, keys/values: all [batch, kept, hidden]
    layers L/2 .. L-2      kept tokens only                       [batch, kept, hidden]
    layer  L-1             full sequence: dropped tokens rejoin   [batch, seq, hidden]
                           with the state they had entering layer L/2-1

Which positions are kept is decided outside the model (``pretrain.importance``); the
model only receives ``kept_idx`` [batch, kept] int64, sorted in sequence order, or None:
no dropping, the one representation of the dense model. The order of the steps is stated
once, by :func:`layer_plan`; the encoder here, the pipeline stages
(:mod:`pretrain.pipeline`) and the FLOPs model (:mod:`pretrain.flops`) all follow it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.kernels import KERNELS, Dropout, attention, layer_norm, token_cross_entropy
from pretrain.masking import IGNORE_INDEX  # label of positions that are not predicted

# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_layers=4, hidden_size=64, num_heads=2, intermediate_size=256),
    "mid": dict(num_layers=12, hidden_size=256, num_heads=4, intermediate_size=1024),
    "bert-base": dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072),
    "bert-large": dict(num_layers=24, hidden_size=1024, num_heads=16, intermediate_size=4096),
}


@dataclass
class ModelConfig:
    """Shape and regularisation of the encoder; the trainer sets vocab_size from the manifest."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # only type 0 is used; kept so exported weights are a standard BERT
    dropout: float = 0.1  # hidden-state dropout, and attention dropout unless set below
    attention_dropout: float | None = None  # None: same as dropout
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    drop_start_layer: int | None = None  # boundary layer; None: num_layers // 2 - 1
    drop_end_layer: int | None = None  # last kept-tokens-only layer; None: num_layers - 2
    # "auto": pretrain.kernels' own attention dropout, dropout and cross-entropy in float32
    # CPU training, where PyTorch's are unfused (same semantics); "torch": PyTorch's ops only;
    # "apex": PyTorch's ops with NVIDIA apex's fused LayerNorm (GPUs; apex must be installed)
    kernels: str = "auto"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_layers < 4 or self.num_layers % 2:
            raise ValueError(
                f"ModelConfig.num_layers must be even and >= 4 for token dropping, "
                f"got {self.num_layers}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {value}")
        if self.kernels not in KERNELS:
            raise ValueError(f"ModelConfig.kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.layer_norm_eps <= 0 or self.initializer_range <= 0:
            raise ValueError("ModelConfig.layer_norm_eps and initializer_range must be > 0")
        layer_split(self)  # validates drop_start_layer / drop_end_layer

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def attention_dropout_p(self) -> float:
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        """A preset (``tiny``, ``mid``, ``bert-base``, ``bert-large``) with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls._from_dict({**PRESETS[name], **overrides}, where=f"preset {name!r}")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Load a JSON object of ModelConfig fields; an optional ``"preset"`` key is the base."""
        return cls._from_dict(cls.json_fields(path), where=str(path))

    @staticmethod
    def json_fields(path: str | Path) -> dict:
        """The fields a JSON model config states, its ``"preset"`` expanded (unchecked
        otherwise: :meth:`from_json` builds the config); raises ValueError."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read model config {path}: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"model config {path} must hold a JSON object")
        preset = data.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(
                    f"{path}: unknown preset {preset!r}; choose one of {sorted(PRESETS)}"
                )
            data = {**PRESETS[preset], **data}
        return data

    @classmethod
    def _from_dict(cls, data: dict, where: str) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{where}: unknown model config keys {unknown}; known: {sorted(known)}"
            )
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf_bert_config(cls, hf) -> ModelConfig:
        """The config of a ``transformers.BertConfig``'s network (the inverse of
        :meth:`to_hf_bert_config`); raises ValueError for one this model cannot be."""
        attention = hf.attention_probs_dropout_prob
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            intermediate_size=hf.intermediate_size,
            max_position_embeddings=hf.max_position_embeddings,
            type_vocab_size=hf.type_vocab_size,
            dropout=hf.hidden_dropout_prob,
            attention_dropout=None if attention == hf.hidden_dropout_prob else attention,
            layer_norm_eps=hf.layer_norm_eps,
            initializer_range=hf.initializer_range,
        )

    def to_hf_bert_config(self) -> dict:
        """Keyword arguments for ``transformers.BertConfig`` describing the same network."""
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            hidden_act="gelu",
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.attention_dropout_p,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            initializer_range=self.initializer_range,
            layer_norm_eps=self.layer_norm_eps,
        )


# ---------------------------------------------------------------------------------------
# The layer split: the one place that says which layer sees which tokens
# ---------------------------------------------------------------------------------------


class LayerSplit(NamedTuple):
    boundary_layer: int  # queries: the kept tokens; keys/values: all tokens
    last_dropped_layer: int  # last layer that sees the kept tokens only; the rest rejoin after it

    def role(self, layer: int) -> str:
        """``"full"``, ``"boundary"`` or ``"kept"``: what layer ``layer`` processes when dropping."""
        if layer == self.boundary_layer:
            return "boundary"
        if self.boundary_layer < layer <= self.last_dropped_layer:
            return "kept"
        return "full"


def layer_split(cfg: ModelConfig) -> LayerSplit:
    """The layers where tokens are dropped. Default (paper): boundary L/2-1, kept-only up to L-2."""
    last_layer = cfg.num_layers - 1
    boundary = cfg.num_layers // 2 - 1 if cfg.drop_start_layer is None else cfg.drop_start_layer
    last_dropped = last_layer - 1 if cfg.drop_end_layer is None else cfg.drop_end_layer
    # The last layer always attends over the full sequence: the dropped tokens rejoin before it.
    if not 0 <= boundary <= last_dropped <= last_layer - 1:
        raise ValueError(
            f"token dropping layers out of range: need 0 <= drop_start_layer ({boundary}) <= "
            f"drop_end_layer ({last_dropped}) <= num_layers - 2 ({last_layer - 1})"
        )
    return LayerSplit(boundary, last_dropped)


class PlanStep(NamedTuple):
    """One step of the network, in forward order (see :func:`layer_plan`).

    ``modules`` names the model pieces the step uses: (attribute in the step's pipeline
    wrapper, dotted path in :class:`BertForTokenDropPretraining`). The pipeline builds its
    wrappers from them, and a pipeline checkpoint's ``<attribute>.<rest>`` parameter maps
    back to ``<path>.<rest>`` of the model.
    """

    role: str  # one of PLAN_ROLES
    layer: int | None  # the encoder layer of the layer roles
    modules: tuple[tuple[str, str], ...]


# Roles of the plan: the embeddings, the encoder layers by what they see, the merge of the
# dropped tokens, the last layer, and the sparse MLM head (transform, tied decoder, bias).
LAYER_ROLES = ("full", "boundary", "kept", "output")
PLAN_ROLES = ("word_embeddings", "embeddings", *LAYER_ROLES, "merge", "mlm_transform")
PLAN_ROLES += ("decoder", "decoder_bias")


def layer_plan(cfg: ModelConfig) -> list[PlanStep]:
    """The network as one ordered list of steps: the single statement of the layer order.

    With the default split of L layers: word embeddings, the rest of the embeddings,
    layers 0..L/2-2 ``full``, layer L/2-1 ``boundary``, layers L/2..L-2 ``kept``, the
    ``merge`` (dropped tokens rejoin), layer L-1 ``output``, then the MLM head.
    """
    split = layer_split(cfg)
    words = (("word_embeddings", "embeddings.word_embeddings"),)
    rest = ("position_embeddings", "token_type_embeddings", "norm", "dropout")
    plan = [
        PlanStep("word_embeddings", None, words),
        PlanStep("embeddings", None, tuple((name, f"embeddings.{name}") for name in rest)),
    ]
    last = cfg.num_layers - 1
    for i in range(last):
        plan.append(PlanStep(split.role(i), i, (("layer", f"encoder.layers.{i}"),)))
        if i == split.last_dropped_layer:
            plan.append(PlanStep("merge", None, ()))
    plan.append(PlanStep("output", last, (("layer", f"encoder.layers.{last}"),)))
    head = (("dense", "mlm_head.dense"), ("norm", "mlm_head.norm"))
    plan += [
        PlanStep("mlm_transform", None, head),
        PlanStep("decoder", None, words),  # tied to the word embeddings
        PlanStep("decoder_bias", None, (("bias", "mlm_head.decoder.bias"),)),
    ]
    return plan


def num_kept_tokens(seq_len: int, keep_ratio: float) -> int:
    """K = round(keep_ratio * seq_len), fixed for a run (static shapes)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return max(1, round(keep_ratio * seq_len))


# ---------------------------------------------------------------------------------------
# Token dropping is a pair of index operations
# ---------------------------------------------------------------------------------------


def _flat_rows(kept_idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[batch, kept] positions -> [batch * kept] row numbers of a [batch * seq, ...] view."""
    offsets = torch.arange(kept_idx.shape[0], device=kept_idx.device) * seq_len
    return (kept_idx + offsets[:, None]).reshape(-1)


def gather_tokens(hidden: torch.Tensor, kept_idx: torch.Tensor) -> torch.Tensor:
    """Select the kept positions: hidden [B, S, ...] and kept_idx [B, K] int64 -> [B, K, ...].

    Works for hidden states [B, S, H] and for masks [B, S]. Backward scatters the gradient
    back (index_add), so it is autograd-friendly.
    """
    batch, seq_len = hidden.shape[:2]
    rows = _flat_rows(kept_idx, seq_len)
    return hidden.flatten(0, 1).index_select(0, rows).unflatten(0, (batch, kept_idx.shape[1]))


def scatter_tokens(full: torch.Tensor, kept: torch.Tensor, kept_idx: torch.Tensor) -> torch.Tensor:
    """Put the kept tokens back: full [B, S, H], kept [B, K, H], kept_idx [B, K] -> [B, S, H].

    Positions not in kept_idx keep the values of ``full`` (for token dropping: the hidden
    state entering the boundary layer). Out of place; gradients flow to both inputs.
    """
    batch, seq_len = full.shape[:2]
    rows = _flat_rows(kept_idx, seq_len)
    merged = full.flatten(0, 1).index_copy(0, rows, kept.flatten(0, 1))
    return merged.unflatten(0, (batch, seq_len))


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------


class Embeddings(nn.Module):
    """Word + position + token type (always 0) embeddings, then LayerNorm and dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, cfg.kernels)
        self.dropout = Dropout(cfg.dropout, cfg.kernels)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids [B, S] -> [B, S, H]. Pretraining uses token type 0 throughout;
        token_type_ids [B, S] (sentence pairs, as a fine-tuned BERT sees them) select rows."""
        return self.add_positions(self.word_embeddings(input_ids), token_type_ids)

    def add_positions(
        self, words: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Word embeddings [B, S, H] -> the embedding output [B, S, H]."""
        seq_len = words.shape[1]
        if seq_len > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings "
                f"{self.position_embeddings.num_embeddings} of the model config"
            )
        positions = self.position_embeddings.weight[:seq_len]  # [S, H]
        if token_type_ids is not None:
            words = words + self.token_type_embeddings(token_type_ids)  # [B, S, H]
            return self.dropout(self.norm(words + positions))
        # Position and token-type rows are shared by the whole batch: add them once, as [S, H].
        position_and_type = positions + self.token_type_embeddings.weight[0]
        return self.dropout(self.norm(words + position_and_type))  # [batch, seq, hidden]


class EncoderLayer(nn.Module):
    """Post-LN BERT layer: x = LN(x + Attn(x)); x = LN(x + FFN(x)).

    ``hidden_q`` [B, Q, H] gives the queries (and the residual stream); ``hidden_kv``
    [B, S, H] gives keys and values, defaulting to ``hidden_q`` (self-attention, fused QKV
    projection). ``key_padding_mask`` [B, S] bool, True = real token, masks keys.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.attention_dropout = cfg.attention_dropout_p
        self.kernels = cfg.kernels
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # rows: query, key, value
        self.attn_out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, cfg.kernels)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ffn_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, cfg.kernels)
        self.dropout = Dropout(cfg.dropout, cfg.kernels)

    def attention(
        self,
        hidden_q: torch.Tensor,
        hidden_kv: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        batch, num_q, hidden_size = hidden_q.shape
        heads, head_dim = self.num_heads, hidden_size // self.num_heads
        if hidden_kv is None:
            # One GEMM for q, k and v; [3, batch, heads, num_q, head_dim] as strided views.
            qkv = self.qkv(hidden_q).view(batch, num_q, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            # Queries from a subset of the tokens (the boundary layer; the last layer in training):
            # the row blocks of the fused weight are contiguous views, so no copy.
            num_kv = hidden_kv.shape[1]
            weight, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(hidden_q, weight[:hidden_size], bias[:hidden_size])
            q = q.view(batch, num_q, heads, head_dim).transpose(1, 2)
            kv = F.linear(hidden_kv, weight[hidden_size:], bias[hidden_size:])
            k, v = kv.view(batch, num_kv, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.attention_dropout if self.training else 0.0
        # [batch, heads, num_q, head_dim]
        attn = attention(q, k, v, key_padding_mask, dropout_p, self.kernels)
        return self.attn_out(attn.transpose(1, 2).reshape(batch, num_q, hidden_size))

    def forward(
        self,
        hidden_q: torch.Tensor,
        hidden_kv: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attn = self.attention(hidden_q, hidden_kv, key_padding_mask)
        hidden = self.attn_norm(hidden_q + self.dropout(attn))
        ffn = self.ffn_out(F.gelu(self.ffn_in(hidden)))
        return self.ffn_norm(hidden + self.dropout(ffn))


class LayerState(NamedTuple):
    """What flows from one encoder layer to the next."""

    hidden: torch.Tensor  # [B, S, H]; between boundary and merge: the state entering the boundary
    key_padding_mask: torch.Tensor | None  # [B, S] bool, True = real token; None: no padding
    kept_idx: torch.Tensor | None  # [B, K] int64 sorted; None: no dropping
    kept: torch.Tensor | None = None  # [B, K, H] the kept tokens, from boundary to merge
    kept_padding_mask: torch.Tensor | None = None  # [B, K] the mask gathered like the tokens


def apply_layer(role: str, layer: EncoderLayer | None, state: LayerState) -> LayerState:
    """One step of the encoder: ``role`` is a layer role of :func:`layer_plan` or ``merge``.

    Without dropping (kept_idx None) every layer sees the full sequence and the merge does
    nothing. The ``output`` role (the last layer) is :func:`apply_output_layer`.
    """
    hidden, mask, kept_idx = state.hidden, state.key_padding_mask, state.kept_idx
    if kept_idx is None or role == "full":
        if role == "merge":
            return state
        return state._replace(hidden=layer(hidden, key_padding_mask=mask))
    if role == "boundary":
        # Kept tokens query all tokens. The padding mask follows the gather, so a kept
        # [PAD] (only in rows with fewer than K real tokens) stays masked.
        kept_mask = None if mask is None else gather_tokens(mask, kept_idx)
        kept = layer(gather_tokens(hidden, kept_idx), hidden, mask)  # [batch, kept, hidden]
        return state._replace(kept=kept, kept_padding_mask=kept_mask)
    if role == "kept":
        return state._replace(kept=layer(state.kept, key_padding_mask=state.kept_padding_mask))
    if role == "merge":
        # Dropped tokens rejoin with the state they had entering the boundary layer.
        merged = scatter_tokens(hidden, state.kept, kept_idx)  # [batch, seq, hidden]
        return state._replace(hidden=merged, kept=None, kept_padding_mask=None)
    raise ValueError(f"apply_layer: unknown role {role!r}")


def apply_output_layer(
    layer: EncoderLayer, state: LayerState, output_idx: torch.Tensor | None
) -> torch.Tensor:
    """The last layer: [B, S, H], or only the positions output_idx [B, P] -> [B, P, H]
    (their queries still attend over the whole sequence)."""
    if output_idx is None:
        return layer(state.hidden, key_padding_mask=state.key_padding_mask)
    queries = gather_tokens(state.hidden, output_idx)
    return layer(queries, state.hidden, state.key_padding_mask)


class TokenDropEncoder(nn.Module):
    """The encoder stack; with ``kept_idx`` the middle layers see only the kept tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.steps = [
            (s.role, s.layer) for s in layer_plan(cfg) if s.role in (*LAYER_ROLES, "merge")
        ]
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(
        self,
        hidden: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        kept_idx: torch.Tensor | None = None,
        output_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden [B, S, H] -> [B, S, H], or [B, P, H] at output_idx [B, P] when given.

        key_padding_mask [B, S] bool (True = real token) or None; kept_idx [B, K] int64
        sorted, or None for the full sequence everywhere (evaluation, export, dense baseline).
        With output_idx the last layer computes only those positions: the MLM loss needs
        no other final state.
        """
        state = LayerState(hidden, key_padding_mask, kept_idx)
        *middle, (_, last) = self.steps
        for role, i in middle:
            state = apply_layer(role, None if i is None else self.layers[i], state)
        return apply_output_layer(self.layers[last], state, output_idx)


class MlmHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then the decoder tied to the embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, cfg.kernels)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)  # weight tied by the model

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V]."""
        return self.decoder(self.transform(hidden))

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """Dense + GELU + LayerNorm: [..., H] -> [..., H]."""
        return self.norm(F.gelu(self.dense(hidden)))


class MlmOutput(NamedTuple):
    """The MLM loss of a micro-batch over N prediction slots, some of them padding.

    Shapes are static (N = batch x prediction width) and nothing here is read on the host,
    so a training step needs no device synchronisation (the trainer reads its sums once
    per logged step). Padding slots carry target -100, loss 0 and no gradient.
    """

    loss: torch.Tensor  # scalar: mean cross-entropy over the real predictions
    token_losses: torch.Tensor  # [N] float32, detached, 0 in padding slots: the table's feed
    target_ids: torch.Tensor  # [N] int64: the label ids, -100 in padding slots
    valid: torch.Tensor  # [N] bool: the slot holds a real prediction
    num_correct: torch.Tensor  # int64 scalar: argmax predictions equal to the label
    num_predictions: torch.Tensor  # int64 scalar: real predictions (valid.sum())


def key_padding_mask_of(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """attention_mask [B, S] (1/True = real token) -> bool [B, S], or None when nothing is
    padded: SDPA then skips masking altogether (Hugging Face BERT does the same).

    Reads the mask on the host: for evaluation and export. The training step leaves that
    decision to the caller, who has the batch on the CPU (:meth:`BertForTokenDropPretraining.forward`).
    """
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    return None if bool(mask.all()) else mask


def prediction_positions(
    labels: torch.Tensor, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted positions per row: labels [B, S] -> positions [B, P] int64, valid [B, P] bool.

    P is ``width`` (static shapes, no host read; rows must not predict more positions than
    that, which :func:`pretrain.masking.max_predictions` guarantees for the run's masking),
    or, when None, the largest number of predicted positions in a row (at least 1; read
    on the host). Row b lists its predicted positions in ascending order, then filler
    positions marked invalid, so that ``x[valid]`` of a per-position tensor x [B, P, ...]
    follows the row-major order of ``labels != -100``.
    """
    predicted = labels != IGNORE_INDEX  # [batch, seq]
    counts = predicted.sum(dim=1)  # [batch]
    if width is None:
        width = max(int(counts.max()), 1) if labels.numel() else 1
    order = predicted.to(torch.int32).argsort(dim=1, descending=True, stable=True)
    positions = order[:, :width]  # [batch, P]
    valid = torch.arange(width, device=labels.device)[None, :] < counts[:, None]  # [batch, P]
    return positions, valid


def masked_lm_loss(
    head: MlmHead, hidden: torch.Tensor, target_ids: torch.Tensor, kernels: str = "auto"
) -> MlmOutput:
    """Sparse prediction: hidden [N, H] of N prediction slots, target_ids [N] int64 (-100:
    a padding slot)."""
    return mlm_loss(head(hidden), target_ids, kernels)  # logits [N, vocab]


def mlm_loss(logits: torch.Tensor, target_ids: torch.Tensor, kernels: str = "auto") -> MlmOutput:
    """Mean cross-entropy of logits [N, V] against target_ids [N] (-100: a padding slot),
    with the per-slot losses the importance table needs (also the pipeline's last-stage loss)."""
    valid = target_ids != IGNORE_INDEX  # [N]
    targets = target_ids.clamp(min=0)  # padding slots score id 0; their loss is masked out
    # The loss in at least float32 whatever the compute dtype (bf16/fp16 training).
    logits_fp32 = logits.to(torch.promote_types(logits.dtype, torch.float32))
    token_losses = token_cross_entropy(logits_fp32, targets, kernels)  # [N]
    token_losses = torch.where(valid, token_losses, 0.0)
    num_predictions = valid.sum()
    loss = token_losses.sum() / num_predictions.clamp(min=1)
    with torch.no_grad():
        num_correct = ((logits.argmax(dim=-1) == target_ids) & valid).sum()
    return MlmOutput(loss, token_losses.detach(), target_ids, valid, num_correct, num_predictions)


class BertForTokenDropPretraining(nn.Module):
    """Embeddings -> token-dropping encoder -> sparse MLM head (MLM only, no NSP)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = TokenDropEncoder(cfg)
        self.mlm_head = MlmHead(cfg)
        self.mlm_head.decoder.weight = self.embeddings.word_embeddings.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # BERT's initialisation: N(0, 0.02) weights, zero biases, LayerNorm = identity.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.initializer_range)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        elif hasattr(module, "normalized_shape"):  # nn.LayerNorm, apex's FusedLayerNorm
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kept_idx: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states [B, S, H]; tokens are dropped in the middle layers iff kept_idx."""
        hidden = self.embeddings(input_ids, token_type_ids)
        return self.encoder(hidden, key_padding_mask_of(attention_mask), kept_idx)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        kept_idx: torch.Tensor | None = None,
        prediction_width: int | None = None,
    ) -> MlmOutput:
        """input_ids [B, S], attention_mask [B, S] (True/1 = real token) or None (nothing is
        padded: the caller decides, on the host), labels [B, S] (-100 = not predicted),
        kept_idx [B, K] int64 sorted, or None (no dropping), prediction_width P: the static
        number of prediction slots per row (None: the most any row has, read on the host).

        Only the prediction slots go through the last layer's queries and the head. With
        ``prediction_width`` the step has static shapes and no host synchronisation.
        """
        output_idx, output_valid = prediction_positions(labels, prediction_width)  # [batch, P]
        mask = None if attention_mask is None else attention_mask.bool()
        hidden = self.embeddings(input_ids)
        hidden = self.encoder(hidden, mask, kept_idx, output_idx)  # [batch, P, hidden]
        target_ids = torch.where(output_valid, labels.gather(1, output_idx), IGNORE_INDEX)
        return masked_lm_loss(
            self.mlm_head, hidden.flatten(0, 1), target_ids.flatten(), self.cfg.kernels
        )

    def full_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MLM logits [B, S, V] at every position, no dropping (evaluation and export checks)."""
        return self.mlm_head(self.encode(input_ids, attention_mask, None, token_type_ids))


# ---------------------------------------------------------------------------------------
# Hugging Face naming (export, and --init-from a Hugging Face BERT)
# ---------------------------------------------------------------------------------------


# an encoder layer's modules here -> in transformers' BertLayer (Q, K, V aside: fused here)
_HF_LAYER_NAMES = {
    "attn_out": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "ffn_norm": "output.LayerNorm",
}


def hf_bert_state_dict(model: BertForTokenDropPretraining) -> dict[str, torch.Tensor]:
    """The model's weights under ``transformers.BertForMaskedLM`` names (fused QKV split)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hidden = model.cfg.hidden_size
    out = {
        "bert.embeddings.word_embeddings.weight": sd["embeddings.word_embeddings.weight"],
        "bert.embeddings.position_embeddings.weight": sd["embeddings.position_embeddings.weight"],
        "bert.embeddings.token_type_embeddings.weight": sd[
            "embeddings.token_type_embeddings.weight"
        ],
        "bert.embeddings.LayerNorm.weight": sd["embeddings.norm.weight"],
        "bert.embeddings.LayerNorm.bias": sd["embeddings.norm.bias"],
        "cls.predictions.transform.dense.weight": sd["mlm_head.dense.weight"],
        "cls.predictions.transform.dense.bias": sd["mlm_head.dense.bias"],
        "cls.predictions.transform.LayerNorm.weight": sd["mlm_head.norm.weight"],
        "cls.predictions.transform.LayerNorm.bias": sd["mlm_head.norm.bias"],
        "cls.predictions.decoder.weight": sd["mlm_head.decoder.weight"],
        "cls.predictions.decoder.bias": sd["mlm_head.decoder.bias"],
        "cls.predictions.bias": sd["mlm_head.decoder.bias"],
    }
    for i in range(model.cfg.num_layers):
        ours, hf = f"encoder.layers.{i}.", f"bert.encoder.layer.{i}."
        for name in ("weight", "bias"):
            q, k, v = sd[f"{ours}qkv.{name}"].split(hidden)
            out[f"{hf}attention.self.query.{name}"] = q
            out[f"{hf}attention.self.key.{name}"] = k
            out[f"{hf}attention.self.value.{name}"] = v
        for src, dst in _HF_LAYER_NAMES.items():
            out[f"{hf}{dst}.weight"] = sd[f"{ours}{src}.weight"]
            out[f"{hf}{dst}.bias"] = sd[f"{ours}{src}.bias"]
    return out


def from_hf_bert_state_dict(
    hf: dict[str, torch.Tensor], num_layers: int
) -> dict[str, torch.Tensor]:
    """``transformers`` BERT weights (``bert.*`` and ``cls.predictions.*`` names, as
    :func:`hf_bert_state_dict` writes them) under this model's names, Q, K and V fused; the
    inverse of :func:`hf_bert_state_dict`. The pooler and the next-sentence head have no
    counterpart and are not read. Raises KeyError naming the first weight that is missing."""
    out = {
        "embeddings.word_embeddings.weight": hf["bert.embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": hf["bert.embeddings.position_embeddings.weight"],
        "embeddings.token_type_embeddings.weight": hf[
            "bert.embeddings.token_type_embeddings.weight"
        ],
        "embeddings.norm.weight": hf["bert.embeddings.LayerNorm.weight"],
        "embeddings.norm.bias": hf["bert.embeddings.LayerNorm.bias"],
        "mlm_head.dense.weight": hf["cls.predictions.transform.dense.weight"],
        "mlm_head.dense.bias": hf["cls.predictions.transform.dense.bias"],
        "mlm_head.norm.weight": hf["cls.predictions.transform.LayerNorm.weight"],
        "mlm_head.norm.bias": hf["cls.predictions.transform.LayerNorm.bias"],
        # tied to the word embeddings, as in BERT
        "mlm_head.decoder.weight": hf["bert.embeddings.word_embeddings.weight"],
        "mlm_head.decoder.bias": hf["cls.predictions.bias"],
    }
    for i in range(num_layers):
        ours, name = f"encoder.layers.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[f"{ours}qkv.{kind}"] = torch.cat(
                [hf[f"{name}attention.self.{part}.{kind}"] for part in ("query", "key", "value")]
            )
        for src, dst in _HF_LAYER_NAMES.items():
            out[f"{ours}{src}.weight"] = hf[f"{name}{dst}.weight"]
            out[f"{ours}{src}.bias"] = hf[f"{name}{dst}.bias"]
    return out


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, tied weights counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "BertForTokenDropPretraining",
    "Embeddings",
    "EncoderLayer",
    "LAYER_ROLES",
    "LayerSplit",
    "LayerState",
    "PlanStep",
    "MlmHead",
    "MlmOutput",
    "ModelConfig",
    "TokenDropEncoder",
    "apply_layer",
    "apply_output_layer",
    "count_parameters",
    "gather_tokens",
    "from_hf_bert_state_dict",
    "hf_bert_state_dict",
    "layer_plan",
    "layer_split",
    "key_padding_mask_of",
    "masked_lm_loss",
    "mlm_loss",
    "num_kept_tokens",
    "prediction_positions",
    "scatter_tokens",
]
