"""Fine-tuning of exported (or any Hugging Face) BERT encoders on GLUE-format tasks.

``python -m finetune --model HF_DIR --task TASK --output OUT`` fine-tunes the whole encoder
with a classification or regression head (no token dropping), several seeds, and writes
``OUT/results.json``. Modules, in the order a run uses them:

- :mod:`finetune.tasks`: GLUE-format task directories (TSV or JSONL) and the eight GLUE
  tasks' layouts and metrics;
- :mod:`finetune.builtin_task`: two downstream tasks built from the standard library's
  docstrings, available everywhere without a download;
- :mod:`finetune.models`: HF_DIR checks and RUN_DIR export;
- :mod:`finetune.train`: the fine-tuning loop;
- :mod:`finetune.metrics`, :mod:`finetune.baselines`: scores and reference baselines;
- :mod:`finetune.cli`: the command.
"""
