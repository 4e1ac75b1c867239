#!/usr/bin/env bash
# The GPU checks in one run: under 8 minutes on one H100 / H200, random-weight models, nothing downloaded.
#   1. tests      benchmarks/test_gpu.py: bf16 and CUDA correctness (bases, fp32 masters, patching, attention)
#   2. memory     benchmarks/memory.py --model llama3-8b: the memory plan at 8 blocks, batch 16, measured;
#                 and with --checkpoint_blocks --freeze_embedding when this hyperdas.py has them
#   3. step_time  examples/s and step / bare forward at TinyLlama and Llama-3-8B shapes
#   4. torchrun   a 1-GPU torchrun of hyperdas.py --domain verb, if hyperdas.py supports torchrun
# Each check has its own time limit and the whole run a budget; the logs go to one folder, and a summary
# table (with the GPU's name) ends the output. Without a GPU it says so and exits 0.
#
#   bash benchmarks/gpu_check.sh          # PYTHON=python3.11 to choose the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-470}     # seconds for all checks; a check that could not finish inside it is skipped

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no GPU: torch sees no CUDA device here, so there is nothing to check (CPU tests: python -m pytest -q)"
  exit 0
fi
GPU=$("$PY" -c "import torch, transformers as tf
print(torch.cuda.get_device_name(0), '| torch', torch.__version__, '| transformers', tf.__version__)")
LOGS=$(mktemp -d)
START=$SECONDS
ROWS=()
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1

# check NAME LIMIT SUMMARY COMMAND...: run COMMAND with a time limit, show its output, and add a row to
# the summary with its status and the line SUMMARY (a shell filter over its output) picks.
check() {
  local name=$1 limit=$2 summary=$3 t0=$SECONDS rc status result
  shift 3
  if (( SECONDS - START + limit > BUDGET )); then
    ROWS+=("$(printf '%-16s %-14s %5s  %s' "$name" "skipped" "-" "not enough of the ${BUDGET}s budget left")")
    return
  fi
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124) status="timeout ${limit}s" ;;
    *) status="FAILED ($rc)" ;;
  esac
  result=$(bash -c "$summary" < "$LOGS/$name.log")
  ROWS+=("$(printf '%-16s %-14s %4ss  %s' "$name" "$status" $((SECONDS - t0)) "$result")")
}

skip() {
  ROWS+=("$(printf '%-16s %-14s %5s  %s' "$1" "skipped" "-" "$2")")
}

check tests 90 "grep -E '(passed|failed|error)' | tail -1" \
  "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_gpu.py
check memory 150 "tail -1" \
  "$PY" benchmarks/memory.py --model llama3-8b --blocks 8 --batch 16
if "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import targets; f = targets.code_features(); \
             sys.exit(0 if f['checkpoint_blocks'] and f['train_embedding'] else 1)" 2>/dev/null; then
  check memory-levers 110 "tail -1" \
    "$PY" benchmarks/memory.py --model llama3-8b --blocks 8 --batch 16 --checkpoint_blocks --freeze_embedding
else
  skip memory-levers "this hyperdas.py has no checkpoint_blocks / train_embedding yet"
fi
check step_time 170 "awk '(\$1 == \"tinyllama\" || \$1 == \"llama3-8b\") && NF == 10 \
                          {printf \"%s %s ex/s, step/bare %s; \", \$1, \$8, \$10}'" \
  "$PY" benchmarks/step_time.py --shapes tinyllama llama3-8b --repeats 5

# torchrun: only if hyperdas.py says it supports it (a --grad_accum flag or a mention of torchrun).
RAVEL=${RAVEL_DATA:-}
[ -z "$RAVEL" ] && [ -f ../shared/ravel/data.tgz ] && RAVEL=$(cd .. && pwd)/shared/ravel/data.tgz
if ! grep -qE -- '--grad_accum|torchrun' hyperdas.py cli.py 2>/dev/null; then
  skip torchrun "hyperdas.py / cli.py have no --grad_accum flag and no torchrun support yet"
elif ! command -v torchrun >/dev/null; then
  skip torchrun "no torchrun command on this machine"
elif [ -z "$RAVEL" ] && [ ! -d "${HOME}/.cache/hyperdas/ravel" ]; then
  skip torchrun "no RAVEL data here (set RAVEL_DATA to data.tgz); this machine cannot download it"
else
  [ -n "$RAVEL" ] && export RAVEL_DATA=$RAVEL
  check torchrun 120 "grep -E 'disentangle|macro|error' | tail -1" \
    torchrun --standalone --nproc_per_node 1 hyperdas.py --domain verb --epochs 1 --n_train 300 --n_test 100 \
    --out "$LOGS/verb-run"
fi

echo
echo "GPU check summary: $GPU; $((SECONDS - START)) s in all; logs in $LOGS"
printf '%-16s %-14s %5s  %s\n' check status time result
for row in "${ROWS[@]}"; do echo "$row"; done
