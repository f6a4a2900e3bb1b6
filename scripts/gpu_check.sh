#!/usr/bin/env bash
# The GPU check, in one command, on a machine with one or more NVIDIA GPUs:
#   bash scripts/gpu_check.sh [--cpu-smoke] [--parts abcd] [--configs "NAME ..."] [OUT_DIR]
# Everything goes under OUT_DIR (default runs/gpu_check); the summary is OUT_DIR/summary.txt.
# Budget: under 8 minutes on one H100/H200-class GPU (each part prints its time).
#
#   a. NCCL: all_reduce (sum, max; float32, bf16, int64), broadcast (from the first and
#      the last rank), all_gather / reduce_scatter and the project's own collectives
#      (pretrain.distributed, the importance table's sync), values checked, over 1 GPU
#      and over all local GPUs, launched with torchrun; plus the bus bandwidth.
#   b. The tiny model's losses on the GPU against the CPU's, same seed, fp32 (no TF32),
#      dropout 0: 5 steps of BertForTokenDropPretraining + ImportanceTable.select + AdamW;
#      max relative difference within 1e-4 (why: DEVICE_TOLERANCE in scripts/gpu_check.py).
#   c. Each ds_configs/gpu_*.json (found by name, so a new one is checked too; one whose
#      optimizer needs NVIDIA apex is skipped where apex is not installed), `--model tiny`
#      on data_prep's built-in corpus (128 tokens a row): an uninterrupted 20-step run,
#      and a run stopped at step 10
#      (--stop-at-step) then resumed (--resume auto) to 20, launched with `deepspeed`;
#      the two metrics.jsonl must be equal, every field but timings (run.py's defaults
#      otherwise: loss_ema at keep 0.5, dropout 0.1; plus --full-seq-final 4, so the
#      resumed part changes K). Steps 1..10 of the two are both fresh runs: if they
#      already differ, the kernels are not deterministic here, and that config is run
#      again under torch.use_deterministic_algorithms(True) (GPU_CHECK_DETERMINISTIC=1:
#      from the start), where only the resume can make a difference. Batch sizes,
#      precision, ZeRO and optimizer are the JSONs'; only the warmup is shortened (5 steps
#      to 1e-3, copies in OUT_DIR/configs): over 10,000 steps to 1e-4, 20 steps would not
#      change bf16 weights at all, and a broken weight restore would go unseen.
#      Data-parallel configs run on the largest power of two of GPUs up to 8 (their global
#      batch of 256 in micro-batches of 32 allows 1, 2, 4 or 8 ranks); the pipeline config
#      needs --pipeline-stages 2, so 2 GPUs (NCCL refuses two ranks on one GPU): on one GPU
#      it is SKIPPED, since with 1 stage it would be the ZeRO-1 data-parallel path that
#      gpu_zero1_bf16.json already covers.
#   d. python benchmarks/bench_gpu.py --json OUT_DIR/bench_gpu.json: tokens/s, MFU and
#      peak memory of dense and token-dropped bert-base at 128 and 512 tokens, bf16.
#
# Every part runs even after another failed; exit code 0 only when none failed, 2 when
# there is no CUDA device. --cpu-smoke checks the script's own plumbing on a machine
# without a GPU: a on gloo over 1 and 2 CPU ranks, b CPU against CPU (PyTorch's ops
# against the project's CPU kernels), c with cpu_zero2.json and cpu_pipeline.json on 2 CPU
# ranks (--configs for others: zero0..zero3, zero2_bf16, pipeline), d the benchmark's
# smoke test. Needs bash 4.4 or later.
# GPU_CHECK_JOBS: how many training launches of part c run at once (default 6; 1 on CPU).
# PYTHON: the interpreter (default python3); `deepspeed` is run as $PYTHON -m
# deepspeed.launcher.runner (what the `deepspeed` command runs), so both are the same.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEEPSPEED=("$PYTHON" -m deepspeed.launcher.runner)  # the `deepspeed` launcher
SMOKE=0
PARTS=abcd
CONFIGS=""
OUT=""
while (($#)); do
    case $1 in
        --cpu-smoke) SMOKE=1 ;;
        --parts) PARTS=$2; shift ;;
        --configs) CONFIGS=$2; shift ;;
        -h | --help) sed -n '2,44p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: error: unknown option $1" >&2; exit 2 ;;
        *) OUT=$1 ;;
    esac
    shift
done
OUT=${OUT:-runs/gpu_check}

if ! "$PYTHON" -c 'import deepspeed' > /dev/null 2>&1; then
    echo "gpu_check.sh: error: cannot import deepspeed with $PYTHON (pip install -r requirements.txt)" >&2
    exit 2
fi
if ((SMOKE)); then
    NGPU=0
    RANKS=2  # CPU processes stand in for the GPUs
else
    NGPU=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2> /dev/null || echo 0)
    if ((NGPU < 1)); then
        echo "gpu_check.sh: error: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, or with --cpu-smoke to check the script's plumbing" >&2
        exit 2
    fi
    RANKS=$NGPU
fi

mkdir -p "$OUT/logs" "$OUT/status" "$OUT/configs"
rm -f "$OUT"/status/*
LOGS="$OUT/logs"
export PYTHONUNBUFFERED=1
START=$(date +%s.%N)
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
status() { echo "$2 $3" > "$OUT/status/$1"; echo "  -> part $1: $2 $3"; }
pow2_at_most() { local n=$1 p=1; while ((p * 2 <= n)); do p=$((p * 2)); done; echo $p; }
PORT=$((20000 + RANDOM % 20000))
next_port() { PORT=$((PORT + 1)); }

env_line() { "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["line"])' "$OUT/env.json" 2> /dev/null; }
"$PYTHON" scripts/gpu_check.py env --json "$OUT/env.json" > "$LOGS/env.log" 2>&1
echo "env: $(env_line)"
echo "mode: $( ((SMOKE)) && echo "CPU smoke test (plumbing only)" || echo "GPU, $NGPU device(s)"); parts $PARTS; output $OUT"

# -- a. NCCL --------------------------------------------------------------------------
part_a() {
    local sizes=(1) n rc bad=0 extra=()
    if ((SMOKE)); then sizes=(1 2); extra=(--device cpu --mb 16); fi
    if ((!SMOKE && NGPU > 1)); then sizes+=("$NGPU"); fi
    if ((!SMOKE && NGPU == 1)); then echo "  one GPU: the all-GPU run is the 1-GPU run"; fi
    for n in "${sizes[@]}"; do
        timeout -k 10 150 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$n" \
            scripts/gpu_check.py nccl --json "$OUT/nccl_$n.json" "${extra[@]}" > "$LOGS/nccl_$n.log" 2>&1
        rc=$?
        if ((rc == 0)); then
            echo "  $(grep '^nccl:' "$LOGS/nccl_$n.log" | tail -n 1)"
        else
            bad=1
            echo "  $n rank(s): FAIL (exit $rc); $LOGS/nccl_$n.log:"
            grep -E 'FAIL|Error|error' "$LOGS/nccl_$n.log" | grep -v Warning | tail -n 3 | sed 's/^/    /'
        fi
    done
    if ((bad)); then status a FAIL "see $LOGS/nccl_*.log"; else status a PASS "ranks: ${sizes[*]}"; fi
}

# -- b. CPU against GPU -----------------------------------------------------------------
part_b() {
    local extra=() rc
    ((SMOKE)) && extra=(--device cpu)
    timeout -k 10 240 "$PYTHON" scripts/gpu_check.py devices --json "$OUT/devices.json" "${extra[@]}" \
        > "$LOGS/devices.log" 2>&1
    rc=$?
    grep -E '^(devices|  )' "$LOGS/devices.log"
    if ((rc == 0)); then
        status b PASS "$(grep -o 'max relative loss difference [^ ]*' "$LOGS/devices.log")"
    else
        tail -n 3 "$LOGS/devices.log" | sed 's/^/    /'
        status b FAIL "exit $rc, see $LOGS/devices.log"
    fi
}

# -- c. every DeepSpeed config: stop at 10, resume to 20, against 20 straight -----------
part_c() {
    local DATA="$OUT/data" t name src rc failed=0 passed=() skipped=() notes=()
    JOBS_MAX=${GPU_CHECK_JOBS:-6}
    ((SMOKE)) && JOBS_MAX=${GPU_CHECK_JOBS:-1}
    t=$(now)
    "$PYTHON" -m data_prep --input builtin:python-docstrings --output "$DATA" \
        --seq-len 128 --vocab-size 8000 > "$LOGS/data_prep.log" 2>&1
    rc=$?
    echo "  data_prep (built-in corpus, seq 128, vocab 8000): exit $rc, $(since "$t") s"
    if ((rc != 0)); then
        tail -n 3 "$LOGS/data_prep.log" | sed 's/^/    /'
        status c FAIL "data_prep failed, see $LOGS/data_prep.log"
        return
    fi
    if ((!SMOKE)); then  # FusedAdam (the GPU configs' optimizer) is built on first use
        t=$(now)
        timeout -k 10 300 "$PYTHON" -c 'from deepspeed.ops.op_builder import FusedAdamBuilder as B; B().load()' \
            > "$LOGS/fused_adam.log" 2>&1
        rc=$?
        echo "  DeepSpeed FusedAdam op (built or loaded): exit $rc, $(since "$t") s"
        if ((rc != 0)); then
            tail -n 3 "$LOGS/fused_adam.log" | sed 's/^/    /'
            status c FAIL "DeepSpeed's FusedAdam op does not build, see $LOGS/fused_adam.log"
            return
        fi
    fi

    # every ds_configs/gpu_*.json (cpu_*.json in the smoke test): data parallel on DP
    # ranks, the pipelined ones on PP (2 stages x PP/2 data-parallel ranks)
    DP=$(pow2_at_most $((RANKS < 8 ? RANKS : 8))) PP=0
    if ((RANKS >= 2)); then PP=$((2 * $(pow2_at_most $((RANKS / 2 < 8 ? RANKS / 2 : 8))))); fi
    local listed=() chosen=() spec pipe skip
    if ((SMOKE)); then
        DP=2 PP=2
        CONFIGS=${CONFIGS:-"zero2 pipeline"}
        skipped+=("gpu_zero2_fp16.json's fp16 (needs a GPU)")
        mapfile -t listed < <("$PYTHON" scripts/gpu_check.py list-configs --cpu)
    else
        mapfile -t listed < <("$PYTHON" scripts/gpu_check.py list-configs)
    fi
    for spec in "${listed[@]}"; do
        IFS=$'\t' read -r name src pipe skip <<< "$spec"
        [[ -z $CONFIGS || " $CONFIGS " == *" $name "* ]] || continue
        if [[ -n $skip ]]; then
            skipped+=("$name ($skip)")
            echo "  SKIP $name: $skip"
            continue
        fi
        if ((pipe && PP < 2)); then
            skipped+=("$name (needs 2 GPUs for --pipeline-stages 2; this machine has $NGPU)")
            echo "  SKIP $name: --pipeline-stages 2 needs 2 GPUs (NCCL refuses two ranks on one GPU); with 1 stage it would be the data-parallel ZeRO-1 path of gpu_zero1_bf16.json"
            continue
        fi
        "$PYTHON" scripts/gpu_check.py derive-config "ds_configs/$src.json" "$OUT/configs/$src.json"
        chosen+=("$name:$src:$pipe")
    done
    local mode=default
    [[ ${GPU_CHECK_DETERMINISTIC:-0} == 1 ]] && mode=deterministic
    echo "  configs: ${chosen[*]%%:*}; data parallel on $DP rank(s), pipeline on $PP; $JOBS_MAX launch(es) at a time; $mode algorithms"
    run_configs "$mode" "${chosen[@]}"

    local again=()
    for spec in "${chosen[@]}"; do
        name=${spec%%:*}
        judge "$name" "$mode"
        rc=$?
        if ((rc == 0)); then
            passed+=("$name")
        elif ((rc == 3)) && [[ $mode == default ]]; then
            again+=("$spec")
        else
            failed=$((failed + 1))
        fi
    done
    if ((${#again[@]})); then
        # Two fresh runs differed before the checkpoint: the kernels are not deterministic
        # (atomics in a backward pass, for instance), so the resume cannot be judged exactly.
        # Once more with torch.use_deterministic_algorithms(True): then a difference after
        # the checkpoint is the resume's.
        echo "  again with torch.use_deterministic_algorithms(True): ${again[*]%%:*}"
        run_configs deterministic "${again[@]}"
        for spec in "${again[@]}"; do
            name=${spec%%:*}
            if judge "$name" deterministic; then
                passed+=("$name")
                notes+=("$name exact only with deterministic algorithms")
            else
                failed=$((failed + 1))
            fi
        done
    fi
    local extra=""
    ((${#notes[@]})) && extra="; note: ${notes[*]}"
    if ((failed)); then
        status c FAIL "$failed of ${#chosen[@]} config(s) failed; passed: ${passed[*]:-none}; skipped: ${skipped[*]:-none}$extra"
    elif ((${#chosen[@]} == 0)); then
        status c FAIL "no config ran (--configs '$CONFIGS')"
    else
        status c PASS "${passed[*]}; skipped: ${skipped[*]:-none}$extra"
    fi
}

launch() {  # LOG command...: in the background, at most JOBS_MAX at once
    local log=$1
    shift
    while (($(jobs -rp | wc -l) >= JOBS_MAX)); do wait -n; done
    (
        s=$(now)
        timeout -k 15 300 "$@" > "$log" 2>&1
        echo "$? $(since "$s")" > "$log.rc"
    ) &
}

run_configs() {  # MODE SPEC...: each config's uninterrupted and stopped runs, then its resume
    local mode=$1 spec name src pipe world tag t common script rc
    shift
    script=(pretrain/run.py)
    [[ $mode == deterministic ]] && script=(--no_local_rank scripts/gpu_check.py run-deterministic pretrain/run.py)
    t=$(now)
    for wave in first resume; do
        for spec in "$@"; do
            IFS=: read -r name src pipe <<< "$spec"
            tag=$name.$mode
            world=$DP
            common=(--deepspeed_config "$OUT/configs/$src.json" --data "$OUT/data" --model tiny
                --train-steps 20 --eval-every 0 --eval-batches 2 --save-every 0 --full-seq-final 4)
            if ((pipe)); then world=$PP common+=(--pipeline-stages 2); fi
            if [[ $wave == first ]]; then
                rm -rf "$OUT/runs/$tag" "$LOGS/$tag".*
                mkdir -p "$OUT/runs/$tag"
                next_port
                launch "$LOGS/$tag.full.log" "${DEEPSPEED[@]}" --num_gpus "$world" --master_port "$PORT" \
                    "${script[@]}" "${common[@]}" --output "$OUT/runs/$tag/full"
                next_port
                launch "$LOGS/$tag.stop.log" "${DEEPSPEED[@]}" --num_gpus "$world" --master_port "$PORT" \
                    "${script[@]}" "${common[@]}" --output "$OUT/runs/$tag/resumed" --stop-at-step 10
            elif [[ -f $LOGS/$tag.stop.log.rc ]] && read -r rc _ < "$LOGS/$tag.stop.log.rc" && ((rc == 0)); then
                next_port
                launch "$LOGS/$tag.resume.log" "${DEEPSPEED[@]}" --num_gpus "$world" --master_port "$PORT" \
                    "${script[@]}" "${common[@]}" --output "$OUT/runs/$tag/resumed" --resume auto
            fi
        done
        wait
        echo "  $mode: $([[ $wave == first ]] && echo "uninterrupted and stopped runs" || echo "resumed runs"): $(since "$t") s"
        t=$(now)
    done
}

judge() {  # NAME MODE: 0 equal, 1 a launch failed or a difference after the resume, 3 nondeterministic
    local name=$1 mode=$2 tag=$1.$2 run rc secs ok=1 out
    for run in full stop resume; do
        if [[ ! -f $LOGS/$tag.$run.log.rc ]]; then
            echo "  $name: the $run launch did not run (the stopped run failed)"
            ok=0
            continue
        fi
        read -r rc secs < "$LOGS/$tag.$run.log.rc"
        if ((rc != 0)); then
            ok=0
            echo "  $name: the $run launch failed (exit $rc, $secs s; 124/137: timed out), $LOGS/$tag.$run.log:"
            grep -E 'error|Error' "$LOGS/$tag.$run.log" | grep -v -i warn | tail -n 3 | sed 's/^/    /'
        fi
    done
    if ((!ok)); then
        echo "  resume [$name, $mode]: FAIL: a launch failed"
        return 1
    fi
    out=$("$PYTHON" scripts/gpu_check.py resume-compare --name "$name, $mode" \
        --full "$OUT/runs/$tag/full" --resumed "$OUT/runs/$tag/resumed" --log "$LOGS/$tag.resume.log")
    rc=$?
    echo "  $out"
    return $rc
}

# -- d. the benchmark ---------------------------------------------------------------------
part_d() {
    local extra=() rc
    ((SMOKE)) && extra=(--device cpu --model tiny --steps 3 --warmup 1)
    timeout -k 10 420 "$PYTHON" benchmarks/bench_gpu.py --json "$OUT/bench_gpu.json" "${extra[@]}" \
        > "$LOGS/bench_gpu.log" 2>&1
    rc=$?
    grep -v -E '^\[20|Warning|warn\(' "$LOGS/bench_gpu.log" | tail -n 14 | sed 's/^/  /'
    if ((rc == 0)); then
        status d PASS "$OUT/bench_gpu.json"
        "$PYTHON" scripts/gpu_check.py bench-goals "$OUT/bench_gpu.json" | sed 's/^/  /'
    else
        status d FAIL "exit $rc, see $LOGS/bench_gpu.log"
    fi
}

declare -A BUDGET=([a]=45 [b]=30 [c]=210 [d]=150)
declare -A TITLE=([a]="NCCL collectives" [b]="losses, CPU against GPU" [c]="DeepSpeed configs, stop and resume" [d]="benchmark")
((SMOKE)) && TITLE[b]="losses, CPU kernels against PyTorch's (smoke)"
for part in a b c d; do
    [[ $PARTS == *$part* ]] || continue
    echo
    echo "== part $part: ${TITLE[$part]}"
    t=$(now)
    "part_$part"
    secs=$(since "$t")
    echo "   part $part took $secs s (budget ${BUDGET[$part]} s on one GPU)"
    echo "$secs" > "$OUT/status/$part.seconds"
done

TOTAL=$(since "$START")
{
    echo
    echo "== summary ($(date -Is)), $OUT"
    echo "env: $(env_line)"
    ((SMOKE)) && echo "mode: --cpu-smoke: the script's plumbing on the CPU, not a GPU check"
    for part in a b c d; do
        [[ $PARTS == *$part* ]] || continue
        if [[ -f $OUT/status/$part ]]; then
            printf '%s %-48s %6s s  %s\n' "$part" "${TITLE[$part]}" "$(cat "$OUT/status/$part.seconds")" "$(cat "$OUT/status/$part")"
        else
            printf '%s %-48s %6s    %s\n' "$part" "${TITLE[$part]}" "" "FAIL (no result)"
        fi
    done
    echo "total $TOTAL s (budget 480 s on one H100/H200-class GPU)"
} | tee "$OUT/summary.txt"
if grep -q -E '^FAIL' "$OUT"/status/? 2> /dev/null; then exit 1; fi
for part in a b c d; do
    [[ $PARTS == *$part* && ! -f $OUT/status/$part ]] && exit 1
done
exit 0
