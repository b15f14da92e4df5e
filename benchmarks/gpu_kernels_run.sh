#!/usr/bin/env bash
# GPU check and measurement of the HieraVid Triton kernels (issue 8), one command:
#
#     bash benchmarks/gpu_kernels_run.sh          # from a checkout, on a machine with a CUDA GPU
#
# Needs python with torch + triton (e.g. PyTorch 2.11 / Triton 3.6 on an H100/H200); no vLLM, no
# install (hieravid_kernels is loaded from kernels/, pydantic is stubbed when missing).
# 1. kernel vs reference on the GPU (benchmarks/kernels.py --check: the interpreter tests' cases,
#    compiled, plus LLaVA/Qwen-sized ones);
# 2. the benchmark, written into benchmarks/RESULTS.md (kernels section only);
# 3. with SWEEP=1, also a sweep of the greedy kernel's launch configurations;
# 4. with PREFILL=1, also the 7B-shaped prefill with the in-LLM stages (benchmarks/prefill_gpu.py
#    --profile --write: full mode vs EVS as served, launches and syncs of the selections).
# When $OUT is set (the device tool), RESULTS.md and the logs are copied there.
# Extra arguments go to the benchmark (e.g. --quick).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
LOG=${OUT:-/tmp}/gpu_kernels_run.log
: >"$LOG"
status=0
$PY - <<'PYEOF' 2>&1 | tee -a "$LOG"
import torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "missing"
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__}, triton {tv}, {dev}")
PYEOF
echo "== correctness (kernel vs reference on the GPU)" | tee -a "$LOG"
$PY benchmarks/kernels.py --check 2>&1 | tee -a "$LOG" || status=1
echo "== benchmark" | tee -a "$LOG"
$PY benchmarks/kernels.py --write "$@" 2>&1 | tee -a "$LOG" || status=1
if [ "${SWEEP:-0}" = "1" ]; then
    echo "== greedy kernel launch configurations" | tee -a "$LOG"
    $PY benchmarks/kernels.py --sweep 2>&1 | tee -a "$LOG" || status=1
fi
if [ "${PREFILL:-0}" = "1" ]; then
    echo "== 7B-shaped prefill with the in-LLM stages" | tee -a "$LOG"
    $PY benchmarks/prefill_gpu.py --budgets 0.3,0.1 --reps 5 --profile --write 2>&1 \
        | tee -a "$LOG" || status=1
fi
if [ -n "${OUT:-}" ]; then
    cp benchmarks/RESULTS.md "$OUT/" 2>/dev/null || true
fi
exit $status
