#!/usr/bin/env bash
# The GPU check: everything written for the GPU, run once in at most 8 minutes of wall time.
#
# Guide
# -----
# What it runs, each step under its own `timeout` budget (seconds; they sum to 480):
#   install   90  requirements + test requirements (torch kept when a CUDA build is already there), liger-kernel
#   fetch     20  python model.py fetch smollm2 (the real parent; needs the package index)
#   tests     60  pytest -m gpu (CUDA-graph decode, FP8, bf16 paths)
#   kl        40  fused forward-KL loss vs the naive loss and Liger's (PAPER.md section 9 shape)
#   train     60  the 3B train step, ours vs transformers
#   decode    60  the 3B rollout engine vs transformers' generate, with MBU
#   sft_fp8   40  one SFT step in bf16 and in FP8
#   cascade  110  a short gpu-real cascade of SmolLM2 to the 14B ratios on the committed chat mix
#                 (benchmarks/smollm2/mix), its children scored on the held-out task families
# A step that runs past its budget is stopped (status "timeout") and the next one starts. Every step's
# output goes to OUT/<step>.log; the benchmark rows are appended to benchmarks/records.jsonl as usual and
# copied to OUT/records.jsonl; OUT/summary.md is rewritten after every step, so a failure or a kill
# still leaves the summary and the records written so far.
#
# Run on a lent GPU through the device tool: first `status` (can_start_another must be true), then
#   run(command="bash benchmarks/gpu_check.sh \"$OUT\"", timeout_s=600)
# then `give_back`, and commit the rows it appended (the files under files_at: records.jsonl, summary.md).
# Before any device time: `bash benchmarks/gpu_check.sh --dry-run /tmp/gpu_check` runs every step on the
# CPU at tiny sizes (no installs, no network, records.jsonl restored afterwards) in about two minutes;
# tests/test_gpu_check.py runs it in the slow suite.
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [OUT]   (OUT defaults to $OUT, else runs/gpu_check)
set -u

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR="${1:-${OUT:-runs/gpu_check}}"
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python}"
RECORDS=benchmarks/records.jsonl
START_LINES=$(wc -l < "$RECORDS" 2>/dev/null || echo 0)
SUMMARY="$OUT_DIR/summary.md"
ROWS=()
T_START=$(date +%s)

if [ "$DRY" = 1 ]; then
    cp "$RECORDS" "$OUT_DIR/.records.backup"
    DEV=cpu
else
    DEV=cuda
fi

write_summary() {
    {
        echo "# GPU check ($( [ "$DRY" = 1 ] && echo "dry run on the CPU" || echo "GPU" ))"
        echo
        echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(( $(date +%s) - T_START )) s so far"
        echo
        echo "| step | status | seconds | budget | key figure |"
        echo "|---|---|---:|---:|---|"
        for r in "${ROWS[@]}"; do echo "$r"; done
    } > "$SUMMARY"
    tail -n +$((START_LINES + 1)) "$RECORDS" > "$OUT_DIR/records.jsonl" 2>/dev/null
}

# step NAME BUDGET KEY_CMD -- COMMAND...: run COMMAND under `timeout BUDGET`, log to OUT/NAME.log, then
# KEY_CMD (a shell snippet reading the log) gives the summary's key figure.
step() {
    local name=$1 budget=$2 key=$3; shift 4
    local t0 rc status fig
    [ "$DRY" = 1 ] && budget=$((budget * 4))  # the CPU dry run checks the plumbing, not the GPU's time limit
    t0=$(date +%s)
    echo "== $name (budget ${budget}s): $*"
    timeout --kill-after=5 "$budget" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        77) status=skipped ;;
        *) status="fail (rc $rc)" ;;
    esac
    fig=$(LOG="$OUT_DIR/$name.log" bash -c "$key" 2>/dev/null | head -c 160 | tr '\n|' ' /')
    ROWS+=("| $name | $status | $(( $(date +%s) - t0 )) | $budget | ${fig:--} |")
    echo "   $status in $(( $(date +%s) - t0 )) s: ${fig:--}"
    write_summary
}

# the key figure of a benchmark: a few fields of the JSON line it ends with
jkey() { echo "tail -n 1 \"\$LOG\" | $PY -c 'import json,sys; d=json.loads(sys.stdin.read()); $1' "; }

if [ "$DRY" = 1 ]; then
    step install 90 "echo dry run: nothing installed" -- true
    step fetch 20 "tail -n 1 \"\$LOG\"" -- bash -c "$PY -c 'import model; print(model.fetch(\"smollm2\", download=False))' || exit 77"
    step tests 60 "tail -n 1 \"\$LOG\"" -- $PY -m pytest -q -m gpu -p no:cacheprovider tests
    step kl 40 "$(jkey 'r=d["kl"]; print({k: (round(v["seconds"], 4), round(v["peak_gib"], 3)) for k, v in r.items() if isinstance(v, dict) and "seconds" in v}, "fused/naive time", round(r["time_ratio"], 2), "mem", round(r["mem_ratio"], 2))')" \
        -- $PY benchmarks/kl_bench.py --device cpu --tokens 256 --vocab 4096 --d-student 64 --d-teacher 96 --repeats 1 --record
    step train 60 "$(jkey 'r=d["train"]; print({k: (round(v["tok_s"]), v["mfu"] and round(v["mfu"], 3)) for k, v in r.items() if isinstance(v, dict) and "tok_s" in v}, "ours/HF", round(r.get("tok_s_ratio", 0), 2))')" \
        -- $PY benchmarks/train_bench.py --device cpu --preset tiny --batch 2 --seq 64 --record
    step decode 60 "$(jkey 'r=d["rollout"]; print("ours/HF", r.get("ratio_new_tok_s"))')" \
        -- $PY benchmarks/rollout_bench.py --device cpu --rounds 1 --record
    step sft_fp8 40 "$(jkey 'print([(r["precision"], r.get("tokens_per_s") or r.get("unavailable")) for r in d["rows"]])')" \
        -- $PY benchmarks/sft_bench.py --device cpu --iters 1 --record
    step cascade 110 "grep -E '^\| 3b base|^\| 14b base|finished' \"\$LOG\" | tail -n 2" \
        -- $PY cascade.py --preset smoke --chat-data benchmarks/smollm2/mix/chat_mix.jsonl --chat-share 0.3 \
           --out "$OUT_DIR/cascade"
else
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    step install 90 "grep -iE 'liger|Successfully installed' \"\$LOG\" | tail -n 2" -- bash -c "
        if $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
            grep -v '^torch' requirements.txt > /tmp/req-notorch.txt   # keep the machine's CUDA build of torch
            $PY -m pip install -q -r /tmp/req-notorch.txt -r requirements-test.txt || exit 1
        else
            $PY -m pip install -q -r requirements.txt -r requirements-test.txt || exit 1
        fi
        $PY -m pip install -q liger-kernel || echo 'liger-kernel did not install: the kl step runs without it'"
    step fetch 20 "tail -n 1 \"\$LOG\"" -- $PY model.py fetch smollm2
    step tests 60 "tail -n 1 \"\$LOG\"" -- $PY -m pytest -q -m gpu -p no:cacheprovider tests
    step kl 40 "$(jkey 'r=d["kl"]; print({k: (round(v["seconds"], 4), round(v["peak_gib"], 3)) for k, v in r.items() if isinstance(v, dict) and "seconds" in v}, "fused/naive time", round(r["time_ratio"], 2), "mem", round(r["mem_ratio"], 2))')" \
        -- $PY benchmarks/kl_bench.py --device cuda --repeats 2 --record
    step train 60 "$(jkey 'r=d["train"]; print({k: (round(v["tok_s"]), v["mfu"] and round(v["mfu"], 3)) for k, v in r.items() if isinstance(v, dict) and "tok_s" in v}, "ours/HF", round(r.get("tok_s_ratio", 0), 2))')" -- $PY benchmarks/train_bench.py --device cuda --record
    step decode 60 "$(jkey 'r=d["rollout"]; print("ours/HF", r.get("ratio_new_tok_s"), "MBU", r.get("ours", {}).get("mbu"))')" \
        -- $PY benchmarks/rollout_bench.py --device cuda --rounds 2 --record
    step sft_fp8 40 "$(jkey 'print([(r["precision"], r.get("tokens_per_s") or r.get("unavailable")) for r in d["rows"]])')" \
        -- $PY benchmarks/sft_bench.py --device cuda --iters 3 --record
    step cascade 110 "grep -hE '^\| 14b base|finished' \"\$LOG\" \"$OUT_DIR/cascade/results/table.md\" | tail -n 2" \
        -- $PY experiments/real_parent.py --parent smollm2 --preset gpu-real --size 14b --short-steps 40 \
           --long-steps 5 --calib-seqs 32 --eval-batches 1 --chat-data benchmarks/smollm2/mix/chat_mix.jsonl \
           --chat-share 0.5 --math-problems 100 --out "$OUT_DIR/cascade" --results "$OUT_DIR/cascade/results"
fi

write_summary
echo
cat "$SUMMARY"
if [ "$DRY" = 1 ]; then  # the dry run's rows stay in OUT only
    cp "$OUT_DIR/.records.backup" "$RECORDS" && rm -f "$OUT_DIR/.records.backup"
fi
