#!/usr/bin/env bash
# One command on a CUDA machine: the GPU tests, then every GPU benchmark, output under bench/results/.
#
#   bash bench/run_gpu.sh            # tests (-m gpu) + benchmarks
#   SKIP_TESTS=1 bash bench/run_gpu.sh
#   BENCH_ARGS="--budget 1" bash bench/run_gpu.sh   # extra flags passed to every bench script
#
# Writes bench/results/gpu_<timestamp>/{env.txt,pytest_gpu.log,<bench>.log}; the bench scripts also
# append their CSV rows to bench/results/<bench>.csv. Exits non-zero if any step failed (all run).
set -uo pipefail
cd "$(dirname "$0")/.."

python - <<'PY' || { echo "run_gpu.sh: no CUDA device visible to torch; nothing to do" >&2; exit 2; }
import sys, torch
sys.exit(0 if torch.cuda.is_available() else 1)
PY

unset TRITON_INTERPRET                 # compile for the GPU, never interpret
export GRADPROBE_BACKEND="${GRADPROBE_BACKEND:-auto}"   # CUDA tensors -> triton
export HF_HUB_OFFLINE=1
out="bench/results/gpu_$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
status=0

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null
  python -m gradprobe.env 2>/dev/null || python -c "import torch, triton; print(torch.__version__, triton.__version__)"
  git rev-parse HEAD 2>/dev/null
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

if [[ "${SKIP_TESTS:-0}" != "1" ]]; then
  echo "== pytest -m gpu"
  # -m gpu overrides addopts' "not gpu"; backend_params marks every cuda-device case gpu
  python -m pytest tests -m "gpu and not benchmark" -q -ra -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu.log"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
fi

for script in bench/bench_*.py; do
  name="$(basename "$script" .py)"
  if ! python "$script" --help 2>/dev/null | grep -q -- "--device"; then
    echo "== skip $script (no --device option: not a GPU benchmark)"; continue
  fi
  args=(--device cuda)
  if [[ "$name" == bench_row_select ]]; then args+=(--shapes llama); fi
  echo "== python $script ${args[*]} ${BENCH_ARGS:-}"
  # shellcheck disable=SC2086
  python "$script" "${args[@]}" ${BENCH_ARGS:-} 2>&1 | tee "$out/$name.log"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "!! $script failed" >&2; status=1; }
done

echo "results: $out (logs) and bench/results/*.csv (rows appended)"
exit $status
