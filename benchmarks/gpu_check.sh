#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call (device time is short):
#   build the extension, report, run the `gpu` test lane, compute-sanitizer over the CUDA kernels,
#   run the GPU benchmarks (JSON into benchmarks/results/). Logs go to $OUT (or ./gpu_out).
# Usage on the GPU machine, from the repo root:  bash benchmarks/gpu_check.sh [build|test|sanitize|bench ...]
set -uo pipefail
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(build test sanitize bench)
export PYTHONUNBUFFERED=1 VEFAST_CUDA_ARCHS="${VEFAST_CUDA_ARCHS:-90a}" MAX_JOBS="${MAX_JOBS:-16}"
status=0
run() {  # run NAME CMD...: log to $OUT/NAME.log, keep going on failure
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 25
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}
for step in "${steps[@]}"; do
  case "$step" in
    build)    run build $PY -m pip install --no-build-isolation --no-deps -e . && run info $PY -m vefast info ;;
    test)     run test-gpu $PY -m pytest -q -m gpu -p no:cacheprovider tests ;;
    sanitize) run memcheck compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m benchmarks.sanitize
              run racecheck compute-sanitizer --tool racecheck --error-exitcode 9 $PY -m benchmarks.sanitize --small ;;
    bench)    run bench $PY -m benchmarks.run_gpu && cp benchmarks/results/*.json "$OUT"/ 2>/dev/null ;;
    *) echo "unknown step $step (build|test|sanitize|bench)"; status=2 ;;
  esac
done
exit $status
