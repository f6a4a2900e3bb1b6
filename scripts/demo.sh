#!/usr/bin/env bash
# The main job end to end on the built-in corpus (Python's own docstrings): no download.
# Outputs go under runs/demo/ (DEMO_DIR to change).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-runs/demo}
PYTHON=${PYTHON:-python3}

echo "== 1/1 data preparation: builtin:python-docstrings -> $DEMO_DIR/data"
"$PYTHON" -m data_prep --input builtin:python-docstrings --output "$DEMO_DIR/data" \
    --seq-len 128 --vocab-size 8000
"$PYTHON" -m data_prep.inspect "$DEMO_DIR/data" --samples 2

echo
echo "Outputs:"
echo "  data (tokenizer, Arrow shards, manifest): $DEMO_DIR/data"
echo "Training (pretrain/run.py) is not part of the demo yet."
