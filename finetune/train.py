"""Fine-tuning one seed: the whole encoder plus a new head, a short PyTorch loop.

``AutoModelForSequenceClassification`` on the HF directory: BERT's pooler ([CLS] through a
dense layer and tanh) and a linear classifier (one output for a regression, trained on
mean squared error; cross-entropy otherwise). Weights the directory lacks (the head, and
the pooler of a model pretrained without next-sentence prediction) start from the seed.
No token dropping: every token goes through every layer.

AdamW (no weight decay on biases and LayerNorm weights), a linear warmup over the first
``warmup_ratio`` of the steps then linear decay to zero, gradient clipping, dropout as in
the model's config. Each epoch visits the train examples in a seeded random order, in
batches padded to their longest sequence. Given the seed, a CPU run is deterministic.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

from finetune.progress import Progress
from finetune.tasks import Split, Task


@dataclass
class Settings:
    """What ``python -m finetune`` trains with (results.json records the resolved values)."""

    epochs: float = 3.0
    lr: float | None = None  # None: default_lr(model config)
    batch_size: int = 32
    max_seq_len: int | None = None  # None: min(128, the model's max_position_embeddings)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    eval_batch_size: int = 128
    device: str = "auto"  # auto: cuda when available

    def to_dict(self) -> dict:
        return asdict(self)


def default_lr(config: dict) -> float:
    """2e-5 (BERT's usual choice) for BERT-base and larger; 1e-4 below hidden size 768,
    the range Turc et al. (2019) found for small BERTs."""
    return 2e-5 if config.get("hidden_size", 768) >= 768 else 1e-4


def default_max_seq_len(config: dict) -> int:
    return min(128, config.get("max_position_embeddings", 512))


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


@dataclass
class Encoded:
    """A split as token ids (lists of ints, unpadded), in the split's order."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None


def encode(tokenizer, split: Split, max_seq_len: int) -> Encoded:
    """Tokenize a split (pairs as ``[CLS] A [SEP] B [SEP]``, the longer text truncated first)."""
    out = tokenizer(
        split.text_a,
        split.text_b,
        truncation=True,
        max_length=max_seq_len,
        return_attention_mask=False,
    )
    return Encoded(out["input_ids"], out.get("token_type_ids"))


def _batch(encoded: Encoded, indices: list[int], pad_id: int, device: str) -> dict:
    import torch

    length = max(len(encoded.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), length), pad_id, dtype=torch.long)  # [batch, seq]
    mask = torch.zeros((len(indices), length), dtype=torch.long)
    types = torch.zeros((len(indices), length), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(encoded.input_ids[i])
        ids[row, :n] = torch.tensor(encoded.input_ids[i])
        mask[row, :n] = 1
        if encoded.token_type_ids is not None:
            types[row, :n] = torch.tensor(encoded.token_type_ids[i])
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "token_type_ids": types.to(device),
    }


def load_model(task: Task, hf_dir: str, seed: int, device: str):
    """The encoder with a new head for ``task``, the new weights drawn from ``seed``, and
    the names of the weights the directory did not hold."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if task.regression:
        labels = {"num_labels": 1, "problem_type": "regression"}
    else:
        labels = {
            "num_labels": len(task.label_list),
            "problem_type": "single_label_classification",
            "id2label": dict(enumerate(task.label_list)),
            "label2id": {label: i for i, label in enumerate(task.label_list)},
        }
    model, info = AutoModelForSequenceClassification.from_pretrained(
        hf_dir, output_loading_info=True, **labels
    )
    return model.to(resolve_device(device)), sorted(info.get("missing_keys", []))


def predict(model, encoded: Encoded, task: Task, settings: Settings, pad_id: int) -> list:
    """Predicted labels (class strings, or floats for a regression) in the split's order."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    # longest first: few padded tokens, and the largest batch's memory is known at once
    order = sorted(range(len(encoded.input_ids)), key=lambda i: -len(encoded.input_ids[i]))
    out = [None] * len(order)
    with torch.no_grad():
        for start in range(0, len(order), settings.eval_batch_size):
            indices = order[start : start + settings.eval_batch_size]
            logits = model(**_batch(encoded, indices, pad_id, device)).logits.float().cpu()
            if task.regression:
                values = [float(v) for v in logits[:, 0]]
            else:
                values = [task.label_list[k] for k in logits.argmax(-1).tolist()]
            for i, value in zip(indices, values):
                out[i] = value
    return out


def finetune(
    model, task: Task, train: Encoded, settings: Settings, seed: int, pad_id: int
) -> float:
    """Fine-tune ``model`` (from :func:`load_model`) on the train split; it ends in eval
    mode. Returns the seconds taken."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    device = next(model.parameters()).device
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # biases, LayerNorm weights
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.lr,
    )
    n = len(train.input_ids)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total = max(1, math.ceil(settings.epochs * steps_per_epoch))
    scheduler = get_linear_schedule_with_warmup(
        optimizer, round(settings.warmup_ratio * total), total
    )
    if task.regression:
        targets = torch.tensor(task.train.labels, dtype=torch.float)
    else:
        index = {label: i for i, label in enumerate(task.label_list)}
        targets = torch.tensor([index[y] for y in task.train.labels], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)

    t0 = time.time()
    progress = Progress(total, f"{task.name} seed {seed}")
    model.train()
    order, position, running = None, n, None
    for _ in range(total):
        if position >= n:  # a new epoch
            order, position = torch.randperm(n, generator=generator).tolist(), 0
        indices = order[position : position + settings.batch_size]
        position += settings.batch_size
        batch = _batch(train, indices, pad_id, device)
        loss = model(**batch, labels=targets[indices].to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        running = value if running is None else 0.95 * running + 0.05 * value
        progress.update(loss=running, lr=scheduler.get_last_lr()[0])
    progress.close()
    model.eval()
    return time.time() - t0
