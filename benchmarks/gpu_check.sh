#!/usr/bin/env bash
# The GPU checks in one run: under 8 minutes on one H100 / H200, random-weight models, nothing downloaded.
#   1. tests      benchmarks/test_gpu.py: bf16 and CUDA correctness (bases, fp32 masters, patching, attention)
#   2. memory     benchmarks/memory.py --model llama3-8b: the memory plan at 8 blocks, batch 16, measured
#                 (and one cross-attention, K/V repeat_interleave'd vs the query groups folded, as now);
#                 and with --checkpoint_blocks --freeze_embedding when this hyperdas.py has them
#   3. torchrun   hyperdas.py's command line under torchrun, one process per GPU (at most 2), on a random
#                 toy-shaped target and synthetic pairs (benchmarks/targets.py: no data, no build, ~1 min);
#                 with 2 GPUs, DDP over NCCL, its loss history checked against one plain process. With one
#                 GPU, WORLD_SIZE is 1 and hyperdas.processes() joins no process group: the command's GPU
#                 path under torchrun's environment, not DDP (test_scale.py checks DDP on CPU, over gloo)
#   4. step_time  examples/s and step / bare forward at TinyLlama and Llama-3-8B shapes
#   5. torchrun-verb  the same on the toy verb world (hyperdas.py --domain verb), when RAVEL's data and the
#                 built toy target are here (building it takes minutes on CPU: python toy_world.py --domain verb)
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
# torchrun: hyperdas.py's command line, one process per GPU (at most 2). On the synthetic world first
# (benchmarks/targets.py patches in a random target and synthetic pairs), then on the toy verb world if
# it is at hand. The summary picks the run's last line ("saved ... results.json ... (N s)") or its error.
NPROC=$("$PY" -c "import torch; print(min(2, torch.cuda.device_count()))")
RUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
if (( NPROC > 1 )); then WHO="$NPROC processes, DDP over NCCL"; else WHO="1 process, no process group"; fi
FLAGS=(--domain city --epochs 1 --n_train 64 --n_test 32 --grad_accum 2 --checkpoint_blocks --freeze_embedding
       --device cuda)
if ! grep -q -- '--grad_accum' cli.py 2>/dev/null; then
  skip torchrun "cli.py has no --grad_accum flag (no torchrun support) yet"
else
  check torchrun 100 "grep -E '^saved |error' | tail -1 | sed -E 's/^saved .*\\((.*)\\)$/trained, evaluated, saved (\\1)/; s/^/$WHO: /'" \
    "${RUN[@]}" benchmarks/targets.py "${FLAGS[@]}" --out "$LOGS/synthetic-torchrun"
  if (( NPROC > 1 )); then   # DDP: the same history as one process with the whole batch
    export PY LOGS NPROC
    check torchrun-vs-one 120 "tail -1" bash -c '"$PY" benchmarks/targets.py "$@" --out "$LOGS/synthetic-one" \
      > "$LOGS/synthetic-one.log" 2>&1 || { tail -3 "$LOGS/synthetic-one.log"; exit 1; }
      "$PY" - <<"EOF"
import json, os, sys
logs, n = os.environ["LOGS"], os.environ["NPROC"]
h = [[r["loss"] for r in json.load(open(f"{logs}/{d}/checkpoint/training.json"))["history"]]
     for d in ("synthetic-one", "synthetic-torchrun")]
gap = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(*h))
print(f"losses of {len(h[0])} steps, 1 process vs {n}: largest relative gap {gap:.1e}")
sys.exit(0 if len(h[0]) == len(h[1]) and gap < 2e-2 else 1)
EOF' _ "${FLAGS[@]}"
  fi
fi

check step_time 170 "awk '(\$1 == \"tinyllama\" || \$1 == \"llama3-8b\") && NF == 10 \
                          {printf \"%s %s ex/s, step/bare %s; \", \$1, \$8, \$10}'" \
  "$PY" benchmarks/step_time.py --shapes tinyllama llama3-8b --repeats 5

RAVEL=${RAVEL_DATA:-}
[ -z "$RAVEL" ] && [ -f ../shared/ravel/data.tgz ] && RAVEL=$(cd .. && pwd)/shared/ravel/data.tgz
[ -n "$RAVEL" ] && export RAVEL_DATA=$RAVEL
if ! "$PY" -c "import ravel_data; ravel_data.data_dir()" >/dev/null 2>&1; then
  skip torchrun-verb "no RAVEL data here (set RAVEL_DATA to data.tgz); this machine cannot download it"
elif ! "$PY" -c "import sys, toy_world; sys.exit(0 if (toy_world.target_folder('verb') / 'config.json').exists() else 1)" \
     2>/dev/null; then
  skip torchrun-verb "the toy verb target is not built here (python toy_world.py --domain verb, minutes on CPU)"
else
  check torchrun-verb 120 "grep -E '^soft +\\(macro|error' | tail -1 | sed -E 's/ +/ /g; s/^/$WHO; cause isolate disentangle: /'" \
    "${RUN[@]}" hyperdas.py --domain verb --epochs 1 --n_train 200 --n_test 100 --grad_accum 2 --device cuda \
    --out "$LOGS/verb-torchrun"
fi

echo
echo "GPU check summary: $GPU; $((SECONDS - START)) s in all; logs in $LOGS"
printf '%-16s %-14s %5s  %s\n' check status time result
for row in "${ROWS[@]}"; do echo "$row"; done
