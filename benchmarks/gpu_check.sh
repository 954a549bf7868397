#!/usr/bin/env bash
# One call on a lent GPU machine that fills every figure, in stages with time budgets (<= 9 min in all):
#   0 env      environment, nvidia-smi, measured ceilings (device copy GB/s, bf16 GEMM TFLOP/s)
#   1 ext      the CUDA extension carried from the build machine (vefast/_C.abi3.so): load + probe;
#              built here (setup.py build_ext --inplace) only if it does not load
#   2 lane     the gpu test lane, fused-op correctness files first
#   3 bench    benchmarks/run_gpu.py: topics in priority order, each with its budget, JSON per topic
#   4 sanitize compute-sanitizer memcheck + racecheck over benchmarks/sanitize.py (tiny shapes)
# Each stage's log / JSON lands in a work folder that is bundled into $OUT/gpu_check.tgz as soon as
# the stage ends (a timeout still returns the finished stages); $OUT/summary.txt is the table printed last.
#
# Usage, from the repo root:  bash benchmarks/gpu_check.sh [--dry-run] [--budget SECONDS] [--stages "0 1 2 3 4"]
#   --dry-run: everything up to the device calls, on a CPU machine, in < 1 min (CI runs it:
#              tests/test_gpu_script.py): imports, extension load, lane collection, benchmark modules,
#              JSON writer, sanitizer driver on CPU tensors.
# vefast runs from the checkout (PYTHONPATH=.), no install; wheels carried in .whl/ are installed into
# /tmp/site first (no registry there). docs/speed_checks.md ("The one GPU call") has the `run` call.
set -uo pipefail

DRY=0; TOTAL="${VEFAST_GPU_BUDGET_S:-540}"; STAGES="0 1 2 3 4"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) TOTAL="$2"; shift ;;
    --stages) STAGES="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (--dry-run, --budget S, --stages LIST)" >&2; exit 2 ;;
  esac
  shift
done

# ---- the knobs, in one place -------------------------------------------------------------------------
GPU_LANE_SELECT=(-m gpu_lane)            # which tests the gpu lane runs (tests/conftest.py marks them)
GPU_LANE_FIRST=(                         # these files first (fused-path correctness at real sizes), then the rest
  tests/test_attention.py tests/test_qk_prologue.py tests/test_reparam.py tests/test_vf_loss.py
  tests/test_align_loss.py tests/test_norm_modulate.py tests/test_gated_residual.py tests/test_swiglu.py
  tests/test_rope.py tests/test_separation.py tests/test_vr_sampler.py tests/test_distributions.py
  tests/test_foundation.py tests/test_host_syncs.py tests/test_align_modules.py tests/test_patch.py
  tests/test_dit_models.py
)
B_ENV=25 B_EXT=20 B_BUILD=240 B_LANE=170 B_BENCH=245 B_MEMCHECK=45 B_RACECHECK=30   # seconds (sum <= 540)
LANE_SHARDS="${VEFAST_LANE_SHARDS:-4}"   # parallel pytest processes for the lane (16 CPU cores there)
BENCH_TOPICS="${VEFAST_BENCH_TOPICS:-}"  # e.g. "attention attention_block": an issue's own topics first (default:
                                         # every topic, by the priority of benchmarks/run_gpu.py TOPICS)

# ---- set-up ------------------------------------------------------------------------------------------
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu_out}"; mkdir -p "$OUT"
W="$(mktemp -d "${TMPDIR:-/tmp}/vefast_gpu_check.XXXXXX")"; mkdir -p "$W/logs" "$W/results"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" MAX_JOBS="${MAX_JOBS:-16}"
if [ -z "${VEFAST_COMMIT:-}" ] && git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
  VEFAST_COMMIT="$(git -C "$ROOT" rev-parse HEAD)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo -dirty)"
fi
export VEFAST_COMMIT="${VEFAST_COMMIT:-unknown}"
# The dry run checks the script, not the kernels (the CPU test lane does that): no Triton interpreter, the
# ops take their eager paths on CPU tensors (a benchmark's dry_run() at tiny sizes takes seconds, not a minute).
[ $DRY = 1 ] && unset TRITON_INTERPRET
T0=$SECONDS
printf "stage\tstatus\tseconds\tbudget\tnote\n" > "$W/summary.tsv"

RESERVE=15   # seconds kept back: a command stopped at its budget may take this long to exit (SIGKILL after 15 s)
left() { echo $(( TOTAL - RESERVE - (SECONDS - T0) )); }
cap() { local b=$1 l; l=$(left); [ "$l" -lt "$b" ] && b=$l; echo "$b"; }   # a stage's budget: min(own, left)

bundle() {  # the work folder into $OUT, atomically, after every stage
  column -t -s $'\t' "$W/summary.tsv" > "$W/summary.txt" 2>/dev/null || cp "$W/summary.tsv" "$W/summary.txt"
  cp "$W/summary.txt" "$OUT/summary.txt"
  tar -czf "$OUT/gpu_check.tgz.part" -C "$W" . && mv -f "$OUT/gpu_check.tgz.part" "$OUT/gpu_check.tgz"
}

record() { printf "%s\t%s\t%s\t%s\t%s\n" "$@" >> "$W/summary.tsv"; bundle; }

# step NAME BUDGET CMD...: run CMD under BUDGET seconds (SIGINT at the budget, so pytest and Python end
# cleanly and keep their output; SIGKILL 15 s later), log to $W/logs/NAME.log; sets RC.
step() {
  local name=$1 budget=$2; shift 2
  echo "== $name (budget ${budget} s): $*"
  if [ "$budget" -lt 5 ]; then echo "== $name: skipped, ${budget} s left"; RC=skip; return; fi
  local t=$SECONDS
  timeout -s INT -k 15 "$budget" "$@" > "$W/logs/$name.log" 2>&1
  RC=$?
  tail -n 15 "$W/logs/$name.log"
  echo "== $name: rc=$RC in $((SECONDS - t)) s"
}

status_of() {  # RC -> ok / FAIL rc=N / TIMEOUT / skipped / PARTIAL (run_gpu: a topic stopped at its budget)
  case "$1" in 0) echo ok ;; skip) echo skipped ;; 124|137|130) echo TIMEOUT ;; 3) echo PARTIAL ;; *) echo "FAIL rc=$1" ;; esac
}

want() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
worst=0
note_rc() { [ "$1" = 0 ] || [ "$1" = skip ] || worst=1; }

# ---- 0: environment and ceilings ---------------------------------------------------------------------
if want 0; then
  t=$SECONDS
  if ls .whl/*.whl >/dev/null 2>&1; then   # carried wheels (no registry on the GPU machine)
    if [ $DRY = 1 ]; then echo "== wheels carried: $(ls .whl)"
    else $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      > "$W/logs/wheels.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"; fi
  fi
  { echo "commit: $VEFAST_COMMIT"; date -u; uname -a
    if command -v nvidia-smi >/dev/null; then   # read-only queries: the card's settings are left alone
      nvidia-smi; nvidia-smi --format=csv --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu
    fi
    $PY -c "import json, benchmarks.harness as h; print('environment:', json.dumps(h.environment()))"
  } > "$W/logs/env.log" 2>&1
  RC=$?
  tail -n 1 "$W/logs/env.log"
  if [ $DRY = 1 ]; then
    note="dry run: ceilings are measured on the device"
  else
    step ceilings "$(cap $B_ENV)" $PY -m benchmarks.run_gpu --measure-ceilings "$W/results/ceilings.json"
    note="$(grep -h '^ceilings' "$W/logs/ceilings.log" | tail -n 1)"
  fi
  note_rc $RC; record 0-env "$(status_of $RC)" $((SECONDS - t)) $B_ENV "$note"
fi

# ---- 1: the extension --------------------------------------------------------------------------------
# loads vefast/_C.abi3.so through vefast._ext and, on a GPU, runs its probe kernel
cat > "$W/check_ext.py" <<'EOF'
import json, torch
from vefast import _ext
ext = _ext.load()  # raises ExtensionUnavailable with the reason
b = ext.build_info()
line = f"{ext.path.name} loads: torch {b['torch_version']}, CUDA {b['cuda_version']}, SM {b['cuda_archs']}"
if not hasattr(ext, "attention_fwd"):
    raise SystemExit(f"{line}, but without the attention ops")
if torch.cuda.is_available():
    line += f"; its kernels run as sm_{ext.probe_arch(torch.cuda.current_device()) // 10}"
print("extension:", line)
EOF
check_ext=($PY "$W/check_ext.py")
if want 1; then
  t=$SECONDS; note=""
  step ext "$(cap $B_EXT)" "${check_ext[@]}"
  if [ "$RC" != 0 ] && [ $DRY = 0 ]; then   # not carried or not loadable: build it here
    note="built here: "
    step ext-build "$(cap $B_BUILD)" env VEFAST_CUDA_ARCHS="${VEFAST_CUDA_ARCHS:-90a}" $PY setup.py build_ext --inplace
    step ext-after-build "$(cap $B_EXT)" "${check_ext[@]}"
  fi
  if [ $DRY = 1 ] && [ "$RC" != 0 ] && grep -q "was not built" "$W/logs/ext.log"; then
    RC=skip; note="dry run: the extension was not built here (the call carries vefast/_C.abi3.so): "
  elif [ $DRY = 1 ]; then note="dry run, no probe kernel: "; fi
  note="$note$(grep -h '^extension:' "$W/logs"/ext*.log | tail -n 1 | cut -c12-)"
  [ "$RC" = 0 ] || note="$note$(grep -h -E 'Error|error' "$W/logs"/ext*.log | tail -n 1 | cut -c1-160)"
  [ $DRY = 1 ] || timeout 30 $PY -m vefast info --json > "$W/results/vefast_info.json" 2>> "$W/logs/ext.log"
  note_rc $RC; record 1-ext "$(status_of $RC)" $((SECONDS - t)) $B_EXT "$note"
fi

# ---- 2: the gpu test lane ----------------------------------------------------------------------------
if want 2; then
  t=$SECONDS
  files=()
  for f in "${GPU_LANE_FIRST[@]}"; do [ -f "$f" ] && files+=("$f"); done
  for f in tests/test_*.py; do case " ${files[*]} " in *" $f "*) ;; *) files+=("$f") ;; esac; done
  if [ $DRY = 1 ]; then
    step lane "$(cap 60)" $PY -m pytest -p no:cacheprovider "${GPU_LANE_SELECT[@]}" --collect-only -q "${files[@]}"
    note="$(grep -E '^[0-9]+(/[0-9]+)? tests? (collected|selected)|collected' "$W/logs/lane.log" | tail -n 1) (collect only)"
  else
    # LANE_SHARDS pytest processes split the lane (tests/conftest.py --shard I/N): Triton compiles each
    # kernel specialization on one CPU core (~0.5 s each, ~300 of them), so the lane is compile-bound
    b=$(cap $B_LANE); pids=()
    echo "== lane (budget ${b} s, ${LANE_SHARDS} shards)"
    for i in $(seq 0 $((LANE_SHARDS - 1))); do
      timeout -s INT -k 15 "$b" $PY -m pytest -p no:cacheprovider "${GPU_LANE_SELECT[@]}" --shard "$i/$LANE_SHARDS" \
        -q -rfE --durations=10 --junitxml="$W/results/gpu_lane_$i.xml" "${files[@]}" > "$W/logs/lane_$i.log" 2>&1 &
      pids+=($!)
    done
    RC=0
    for pid in "${pids[@]}"; do wait "$pid"; r=$?; [ "$r" -ne 0 ] && [ "$RC" = 0 ] && RC=$r; done
    for i in $(seq 0 $((LANE_SHARDS - 1))); do tail -n 8 "$W/logs/lane_$i.log"; done
    note="$(for i in $(seq 0 $((LANE_SHARDS - 1))); do grep -E '(passed|failed|error|skipped|deselected).* in [0-9.]+s' \
      "$W/logs/lane_$i.log" | tail -n 1 | tr -d '='; done | tr '\n' ';')"
  fi
  note_rc $RC; record 2-lane "$(status_of $RC)" $((SECONDS - t)) $B_LANE "$note"
fi

# ---- 3: benchmarks -----------------------------------------------------------------------------------
if want 3; then
  t=$SECONDS
  if [ $DRY = 1 ]; then
    step bench "$(cap 60)" $PY -m benchmarks.run_gpu --dry-run --results-dir "$W/results"
    note="$(tail -n 1 "$W/logs/bench.log")"
  else
    [ -f "$W/results/ceilings.json" ] || timeout 60 $PY -m benchmarks.run_gpu --measure-ceilings "$W/results/ceilings.json" > "$W/logs/bench-ceilings.log" 2>&1
    b=$(cap $B_BENCH)
    # run_gpu keeps each topic inside its own budget and the stage inside $b; the timeout is a backstop
    if [ "$b" -lt 10 ]; then RC=skip; echo "== bench: skipped, ${b} s left"
    else step bench $((b + 20)) $PY -m benchmarks.run_gpu --budget "$b" --ceilings "$W/results/ceilings.json" \
      --results-dir "$W/results" $BENCH_TOPICS; fi
    note="$($PY -c "import json,sys; print(' '.join(f\"{r['topic']}:{r['status']}({r.get('rows', 0)})\" for r in json.load(open(sys.argv[1]))))" "$W/results/run_gpu_summary.json" 2>/dev/null)"
  fi
  note_rc $RC; record 3-bench "$(status_of $RC)" $((SECONDS - t)) $B_BENCH "$note"
fi

# ---- 4: compute-sanitizer ----------------------------------------------------------------------------
if want 4; then
  for tool in memcheck racecheck; do
    t=$SECONDS
    if [ $tool = memcheck ]; then b=$B_MEMCHECK; args=(); else b=$B_RACECHECK; args=(--small); fi
    if [ $DRY = 1 ]; then
      if [ $tool = memcheck ]; then   # the driver's calls, on CPU tensors (eager paths)
        step sanitize-dry "$(cap 60)" $PY -m benchmarks.sanitize --device cpu --small
        note="dry run: driver on CPU; compute-sanitizer $(command -v compute-sanitizer >/dev/null && echo found || echo 'not on this machine')"
      else RC=skip; note="dry run"; fi
    elif ! command -v compute-sanitizer >/dev/null; then RC=skip; note="compute-sanitizer not found"
    else
      # no caching allocator: memcheck then sees each tensor's own bounds, not a pooled block's
      step $tool "$(cap $b)" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --error-exitcode 9 \
        --print-limit 20 $PY -m benchmarks.sanitize "${args[@]}"
      note="$(grep -h -E 'ERROR SUMMARY|RACECHECK SUMMARY|Device not supported|sanitize: [0-9]+ cases' "$W/logs/$tool.log" | tail -n 2 | tr '\n' ' ')"
    fi
    note_rc $RC; record "4-$tool" "$(status_of $RC)" $((SECONDS - t)) $b "$note"
  done
fi

# ---- summary (printed last) --------------------------------------------------------------------------
bundle
echo
echo "gpu_check: $( [ $DRY = 1 ] && echo 'dry run, ')$((SECONDS - T0)) s of $TOTAL s; logs and JSON: $OUT/gpu_check.tgz (commit $VEFAST_COMMIT)"
cat "$W/summary.txt"
rm -rf "$W"
exit $worst
