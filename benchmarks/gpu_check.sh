#!/usr/bin/env bash
# One GPU check for the fused Triton HSTU attention (issue 6), at most 10 minutes on one H100/H200
# (run it with the device tool's timeout_s=600):
#   0. environment + import hygiene (the GPU path must not need fbgemm_gpu/torchrec at import time); the
#      Gluon forward and dk/dv (never run on a GPU yet) checked alone, and left out of the later stages if
#      they fail
#   1. correctness: triton backend vs the padded reference on the GPU, fwd + 5 grads, bf16 and fp32,
#      with the bias buffer (every autotune config of the attention kernels, the fill, the ds reduction
#      and dq from ds; bias gradients through the ds buffer and in dk/dv's loop; dq from ds, recomputed,
#      or added up by dk/dv) and with the bias computed inline (both time-table lookups)
#   2. benchmarks/hstu_attention.py  (triton variants vs SDPA, kernel GPU times; RESULT line; the padded
#      reference, 0.2 TFLOP/s on an H100, would take a minute: run it alone when needed)
#   3. benchmarks/hstu_step_gpu.py   (dense HSTU training step, paper + large configs; RESULT line)
#   4. Nsight Compute on one tuned fwd+bwd (speed of light, occupancy, stalls, spills), when ncu is there
# Each stage has a time limit: on it, `timeout` sends SIGTERM and the Python stages print the RESULT
# line of what they finished, marked INCOMPLETE (a hung kernel gets SIGKILL after a grace period).
# The benchmark times the default path and SDPA first, at the target's shape (L <= 4096) first.
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
for name in ["modules.hstu_attention_triton", "modules.hstu_attention_gluon", "modules.losses", "modules.config",
             "modules.jagged", "modules.hstu_attention", "modules.hstu"]:
    try:
        importlib.import_module(name)
        print(f"import {name}: ok")
    except Exception as e:  # report, do not stop: the benchmarks fall back where they can
        print(f"import {name}: FAILED {type(e).__name__}: {e}")
print("fbgemm_gpu imported:", "fbgemm_gpu" in sys.modules, "| torchrec imported:", "torchrec" in sys.modules)
PYEOF

# The Gluon kernels have never run on a GPU before: checked alone first, so that a hang or a wrong result
# there only takes them out of the later stages instead of costing those their time. A kernel with a
# failed comparison is left out; after a hang or a crash (no RESULT line: the process did not get to
# print it, even on SIGTERM), both are.
echo "== 0. Gluon forward and dk/dv alone (${SECONDS}s in)" | tee "$LOG/check_gluon.log"
GLUON=()
timeout -k 5 90 "$PY" benchmarks/hstu_attention.py --check --variants rab_buffer_gluon_fwd,rab_buffer_gluon_dkdv \
  2>&1 | tee -a "$LOG/check_gluon.log"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  status=1
  if grep -q "^RESULT check: FAIL" "$LOG/check_gluon.log"; then
    failed_kernels=$(grep -oE "^check rab_buffer_gluon_(fwd|dkdv) .*FAIL" "$LOG/check_gluon.log" \
      | sed -E 's/^check rab_buffer_gluon_(fwd|dkdv) .*/\1/' | sort -u | paste -sd, -)
  else
    failed_kernels=fwd,dkdv
  fi
  [ -n "$failed_kernels" ] && GLUON=(--without-gluon "$failed_kernels")
  echo "Gluon kernels left out below: ${failed_kernels:-none}" | tee -a "$LOG/check_gluon.log"
fi

echo "== 1. correctness (bf16 + fp32) (${SECONDS}s in)" | tee "$LOG/check.log"
timeout -k 15 180 "$PY" benchmarks/hstu_attention.py --check ${GLUON[@]+"${GLUON[@]}"} 2>&1 | tee -a "$LOG/check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 2. attention benchmark (${SECONDS}s in)" | tee "$LOG/bench_attention.log"
timeout -k 15 170 "$PY" benchmarks/hstu_attention.py --skip-padded ${GLUON[@]+"${GLUON[@]}"} 2>&1 \
  | tee -a "$LOG/bench_attention.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 3. HSTU training step (${SECONDS}s in)" | tee "$LOG/bench_step.log"
timeout -k 10 65 "$PY" benchmarks/hstu_step_gpu.py --steps 8 2>&1 | tee -a "$LOG/bench_step.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 4. Nsight Compute profile of the tuned kernels (${SECONDS}s in)" | tee "$LOG/ncu.txt"
NCU="$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)"
if [ -n "$NCU" ]; then  # diagnosis only: its failure does not fail the check
  # only the attention kernels (the plan's and autograd's small torch kernels would crowd them out);
  # clocks left as they are, as the timings above ran
  timeout 30 "$NCU" --profile-from-start off --clock-control none --kernel-name regex:_hstu \
    --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section LaunchStats --section MemoryWorkloadAnalysis \
    "$PY" benchmarks/hstu_attention.py --profile-once >> "$LOG/ncu.txt" 2>&1
  grep -E "^  _hstu|Duration|Registers Per|Achieved Occupancy|L1/TEX Cache Throughput|Compute \(SM\)|Local Memory Spilling Req|Warp Cycles Per Issued" "$LOG/ncu.txt"
else
  echo "ncu not found; skipped" | tee -a "$LOG/ncu.txt"
fi

echo "== summary (exit $status, ${SECONDS}s)" | tee "$LOG/summary.txt"
grep -h "^RESULT" "$LOG"/check_gluon.log "$LOG"/check.log "$LOG"/bench_attention.log "$LOG"/bench_step.log \
  | tee -a "$LOG/summary.txt"
exit $status
