#!/usr/bin/env bash
# One GPU check for the fused Triton HSTU attention (issue 6), sized for ~8 minutes on one H100/H200:
#   0. environment + import hygiene (the GPU path must not need fbgemm_gpu/torchrec at import time)
#   1. correctness: triton backend vs the padded reference on the GPU, fwd + 5 grads, bf16 and fp32
#   2. benchmarks/hstu_attention.py  (triton vs SDPA vs padded reference; RESULT line)
#   3. benchmarks/hstu_step_gpu.py   (dense HSTU training step, paper + large configs; RESULT line)
# Logs go to $OUT (if set) or /tmp/gpu_check. Usage, from the repo root: bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
LOG="${OUT:-/tmp/gpu_check}"
mkdir -p "$LOG"
PY="${PYTHON:-python3}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton_cache_hstu}"
export PYTHONUNBUFFERED=1
export TRITON_PRINT_AUTOTUNING=1  # log the config the autotuner picks per shape, for the next tuning pass
unset TRITON_INTERPRET
status=0

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$LOG/env.txt"

"$PY" - <<'PYEOF' 2>&1 | tee "$LOG/imports.txt"
import importlib, sys
for name in ["modules.hstu_attention_triton", "modules.losses", "modules.config", "modules.jagged",
             "modules.hstu_attention", "modules.hstu"]:
    try:
        importlib.import_module(name)
        print(f"import {name}: ok")
    except Exception as e:  # report, do not stop: the benchmarks fall back where they can
        print(f"import {name}: FAILED {type(e).__name__}: {e}")
print("fbgemm_gpu imported:", "fbgemm_gpu" in sys.modules, "| torchrec imported:", "torchrec" in sys.modules)
PYEOF

echo "== 1. correctness (bf16 + fp32)" | tee "$LOG/check.log"
timeout 170 "$PY" benchmarks/hstu_attention.py --check 2>&1 | tee -a "$LOG/check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 2. attention benchmark (${SECONDS}s in)" | tee "$LOG/bench_attention.log"
timeout 170 "$PY" benchmarks/hstu_attention.py 2>&1 | tee -a "$LOG/bench_attention.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 3. HSTU training step (${SECONDS}s in)" | tee "$LOG/bench_step.log"
timeout 130 "$PY" benchmarks/hstu_step_gpu.py --steps 8 2>&1 | tee -a "$LOG/bench_step.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== summary (exit $status, ${SECONDS}s)" | tee "$LOG/summary.txt"
grep -h "^RESULT" "$LOG"/check.log "$LOG"/bench_attention.log "$LOG"/bench_step.log | tee -a "$LOG/summary.txt"
exit $status
