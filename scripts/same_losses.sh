#!/usr/bin/env bash
# Check that a change leaves every number of training unchanged: the same nine short runs
# (ZeRO 2 and 3, pipeline with and without dropout and the full-sequence phase, a dense
# pipeline, frequency, random, none, one rank) of an older commit and of the working
# tree, their metrics.jsonl compared field by field (timings aside).
#   bash scripts/same_losses.sh OLD_REV [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OLD_REV=$1; WORK=${2:-$(mktemp -d)}
PYTHON=${PYTHON:-python3}
DATA="$WORK/data"
git worktree add --detach "$WORK/old" "$OLD_REV" > /dev/null
trap 'git worktree remove --force "$WORK/old"' EXIT
(cd tests && "$PYTHON" -c "
import sys; sys.path.insert(0, '..'); from pathlib import Path; from corpus import make_data
make_data(Path('$DATA'), seed=21)" > /dev/null)
runs() {  # TREE OUT
    local tree=$1 out=$2 port=29611
    mkdir -p "$out"
    common=(--data "$DATA" --model tiny --eval-every 20 --eval-batches 2 --save-every 0)
    ds() { port=$((port + 1)); (cd "$tree" && deepspeed --num_gpus 2 --master_port $port pretrain/run.py "$@") > "$out/log.$port" 2>&1; }
    ds --deepspeed_config ds_configs/cpu_zero2.json "${common[@]}" --output "$out/z2" --train-steps 40
    ds --deepspeed_config ds_configs/cpu_zero3.json "${common[@]}" --output "$out/z3" --train-steps 20
    ds --deepspeed_config ds_configs/cpu_pipeline.json "${common[@]}" --output "$out/pipe" --train-steps 30 --pipeline-stages 2 --full-seq-final 5
    ds --deepspeed_config ds_configs/cpu_pipeline.json "${common[@]}" --output "$out/pipe0" --train-steps 30 --pipeline-stages 2 --dropout 0
    ds --deepspeed_config ds_configs/cpu_pipeline.json "${common[@]}" --output "$out/pipenone" --train-steps 10 --pipeline-stages 2 --token-drop none
    for s in frequency random none; do
        ds --deepspeed_config ds_configs/cpu_zero0.json "${common[@]}" --output "$out/$s" --train-steps 10 --token-drop $s
    done
    (cd "$tree" && "$PYTHON" pretrain/run.py --deepspeed_config ds_configs/cpu_zero1.json "${common[@]}" --output "$out/single" --train-steps 30 --dropout 0) > "$out/log.single" 2>&1
}
runs "$WORK/old" "$WORK/runs_old"
runs "$PWD" "$WORK/runs_new"
"$PYTHON" - "$WORK/runs_old" "$WORK/runs_new" <<'PY'
import json, os, sys
old, new = sys.argv[1:3]
TIMING = {"tokens_per_s", "step_s", "table_sync_s"}
def lines(path):
    return [{k: v for k, v in json.loads(l).items() if k not in TIMING} for l in open(path)]
bad = 0
for run in sorted(os.listdir(old)):
    path = os.path.join(old, run, "metrics.jsonl")
    if os.path.isfile(path):
        same = lines(path) == lines(os.path.join(new, run, "metrics.jsonl"))
        bad += not same
        print(f"{run:10s} {'bit-identical' if same else 'DIFFERENT'}")
sys.exit(bad)
PY
