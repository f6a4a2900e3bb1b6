#!/usr/bin/env bash
# The main job end to end on the built-in corpus (Python's own docstrings): no download.
#   1. data preparation: tokenizer + Arrow shards
#   2. two-rank DeepSpeed training (ZeRO-2, CPU) with token dropping, stopped at step 30
#      with a checkpoint, as a time-limited cluster job would be
#   3. the same command with --resume auto continues to step 60
#   4. export of the run as a Hugging Face BERT directory, and a fill-mask example from it
#   5. a brief fine-tuning of the export on the built-in topic task, with baselines
#   6. the report of the run: plots and a summary table
# Outputs go under runs/demo/ (DEMO_DIR to change); a rerun starts the training afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-runs/demo}
PYTHON=${PYTHON:-python3}
DATA="$DEMO_DIR/data"
RUN="$DEMO_DIR/run"

echo "== 1/6 data preparation: builtin:python-docstrings -> $DATA"
"$PYTHON" -m data_prep --input builtin:python-docstrings --output "$DATA" \
    --seq-len 128 --vocab-size 8000
"$PYTHON" -m data_prep.inspect "$DATA" --samples 1

rm -rf "$RUN"
TRAIN=(pretrain/run.py --deepspeed_config ds_configs/cpu_zero2.json --data "$DATA"
       --output "$RUN" --model tiny --train-steps 60 --token-drop loss_ema --keep-ratio 0.5
       --eval-every 30 --save-every 0)
echo
echo "== 2/6 training on 2 ranks with token dropping, stopping at step 30 with a checkpoint"
echo "   (the first DeepSpeed run on a machine compiles a communication op: about 90 s)"
deepspeed --num_gpus 2 "${TRAIN[@]}" --stop-at-step 30 2>&1 | grep -v '^\[20'

echo
echo "== 3/6 resuming from the checkpoint to step 60"
deepspeed --num_gpus 2 "${TRAIN[@]}" --resume auto 2>&1 | grep -v '^\[20'

echo
echo "Last metrics lines ($RUN/metrics.jsonl):"
tail -n 3 "$RUN/metrics.jsonl"

HF="$DEMO_DIR/hf"
echo
echo "== 4/6 export to a Hugging Face directory, then fill-mask with transformers"
"$PYTHON" -m pretrain.export "$RUN" --output "$HF" --overwrite
HF_HUB_OFFLINE=1 "$PYTHON" - "$HF" <<'PY'
import sys
from transformers import pipeline

fill = pipeline("fill-mask", model=sys.argv[1])
text = "Return the [MASK] of the file."
print(f"  {text}")
for guess in fill(text, top_k=3):
    print(f"    {guess['score']:.3f}  {guess['sequence']}")
PY

echo
echo "== 5/6 fine-tuning the export briefly on builtin:topic (four classes of sentences)"
HF_HUB_OFFLINE=1 "$PYTHON" -m finetune --model "$HF" --task builtin:topic \
    --output "$DEMO_DIR/finetune" --seeds 1 --lr 5e-4 --baselines

echo
echo "== 6/6 the report of the run: plots against steps, time and FLOPs, the importance table"
"$PYTHON" -m pretrain.report "$RUN" --output "$DEMO_DIR/report" \
    --finetune "$RUN=$DEMO_DIR/finetune/results.json"
echo
echo "Outputs:"
echo "  data (tokenizer, Arrow shards, manifest)  $DATA"
echo "  run config                                $RUN/config.json"
echo "  metrics, one JSON line per step           $RUN/metrics.jsonl"
echo "  checkpoints (DeepSpeed, sharded)          $RUN/checkpoints"
echo "  TensorBoard events                        $RUN/tensorboard"
echo "  Hugging Face model (transformers)         $HF"
echo "  fine-tuning results                       $DEMO_DIR/finetune/results.json"
echo "  report (plots, open index.md)             $DEMO_DIR/report"
