#!/usr/bin/env bash
# Every check that needs a GPU, for one lent GPU machine (see README "Building for GPU"),
# in one call of at most 10 minutes: a session gets 15 minutes of device time in all,
# start-up included, so the stages run in order of value under one time budget.
#
#   bash benchmarks/gpu_session.sh [STAGE ...]      default: build bench test sanitize profile
#
# Stages (a fresh machine needs `build` first in every call):
#   build     pip install --no-build-isolation -e . (the C++/CUDA extension, in place; for
#             this GPU's architecture only, unless TORCH_CUDA_ARCH_LIST is set), then
#             `python -m margin_ops` (which backends this install has)
#   bench     python benchmarks/run.py on the named shapes (bf16): every usable backend and
#             contender side by side; it checks each one's loss and gradients
#   test      the GPU tests: the conformance suite on the 'cuda' and 'triton' backends and
#             tests/test_cuda.py (both GPU backends, including which kernels run on sm_90)
#   sanitize  compute-sanitizer memcheck and racecheck on a small forward + backward of every
#             margin through the CUDA backend: bf16 and fp32 at odd sizes (the mma.sync /
#             SIMT kernels) and bf16 / fp16 at D = 64 (the sm_90a kernels on an H100 / H200)
#   profile   ncu (Speed Of Light, occupancy, launch statistics) of the main kernels of one
#             bf16 forward + backward on webface42m-8gpu
#   bench-fp32  run.py in fp32 under "high" on ms1mv2 and webface42m-8gpu
#   bench-v2  the margin family v2 rows: AdaFace and sub-center ArcFace (K = 3) on ms1mv2
#             and 1m, bf16, against torch.compile and eager
#   suite     the whole test suite on the GPU machine, as a regression check
#   dist      benchmarks/distributed_overhead.py at world size 1 (NCCL)
#
# Time: GPU_SESSION_BUDGET_S (default 540) seconds for the whole call; each stage runs under
# `timeout` with at most its own cap (build 240, bench 210, test 150, sanitize 120,
# profile 90, the others 200) and what is left of the budget; a stage with under 30 s left
# is skipped, and says so.
#
# Outputs, in $OUT (the device tool's folder that comes back) or else gpu-out/, written as
# the stages run so that a call cut off at its limit still reports: <stage>.log and
# bench/results.{md,json,png}: the default stages make exactly 8 files, the most a device
# call brings back. bench-fp32 and bench-v2 write their own folders of three: run them in
# another call.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${OUT:-gpu-out}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
export PY=${PYTHON:-python3}
BUDGET=${GPU_SESSION_BUDGET_S:-540}
stages=("$@")
((${#stages[@]})) || stages=(build bench test sanitize profile)

run_stage() {  # name, cap in seconds, command...: runs the command under the time budget,
  local name=$1 cap=$2   # its output to the terminal and to the stage's log
  shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 30)); then
    echo "== $name: skipped, ${left} s of the ${BUDGET} s budget left" | tee -a "$LOGS/$name.log"
    return 1
  fi
  local limit=$((cap < left ? cap : left))
  echo "== $name (limit ${limit} s): $*" | tee -a "$LOGS/$name.log"
  local start=$SECONDS
  if declare -F "$1" >/dev/null; then  # a function of this script: timeout needs a process
    timeout --kill-after=10 "$limit" bash -c "$(declare -f "$1"); $*" 2>&1 | tee -a "$LOGS/$name.log"
  else
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOGS/$name.log"
  fi
  local rc=${PIPESTATUS[0]}
  ((rc == 124)) && echo "== $name: TIMED OUT at ${limit} s" | tee -a "$LOGS/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOGS/$name.log"
  return "$rc"
}

sanitizer_case() {  # tool: one small fused forward + backward per margin, dtype and size
  compute-sanitizer --tool "$1" --error-exitcode 1 "$PY" - <<'EOF'
import torch
import margin_ops

torch.manual_seed(0)
# (N, D, C, dtypes): odd sizes (a partial row tile, a partial class tile, D % 8 != 0: the
# mma.sync / SIMT kernels), then D = 64 with two row tiles and a partial class tile (the
# sm_90a kernels where the device is compute capability 9.0)
cases = [(37, 45, 1009, (torch.bfloat16, torch.float32)),
         (150, 64, 1500, (torch.bfloat16, torch.float16))]
with margin_ops.backend("cuda"):
    for n, d, c, dtypes in cases:
        for dtype in dtypes:
            x = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(c, d, device="cuda", dtype=dtype, requires_grad=True)
            y = torch.randint(0, c, (n,), device="cuda")
            y[3] = -100
            for name, kwargs in [("arcface", {}), ("cosface", {}), ("combined", {}),
                                 ("sphereface", dict(m=4, lamb=5.0))]:
                loss = getattr(torch.ops.margin, name)(x, w, y, **kwargs)
                loss.backward()
                torch.cuda.synchronize()
                assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
                x.grad = w.grad = None
            print(n, d, c, dtype, "ok")
EOF
}

profile_case() {  # ncu of one bf16 forward + backward (after a warm-up) on webface42m-8gpu
  ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
    --kernel-name regex:'fwd_main|bwd_tile|bwd_gemm|bwd_dw|bwd_dx' --launch-skip 8 --launch-count 8 \
    "$PY" - <<'EOF'
import torch
import margin_ops

torch.manual_seed(0)
n, d, c = 1024, 512, 257_489
x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = torch.randn(c, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
y = torch.randint(0, c, (n,), device="cuda")
with margin_ops.backend("cuda"):
    for _ in range(2):
        torch.ops.margin.arcface(x, w, y).backward()
torch.cuda.synchronize()
print("profiled", n, d, c)
EOF
}

arch_list() {  # this machine's GPU architecture for TORCH_CUDA_ARCH_LIST ("9.0a" on Hopper)
  local cc
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
  case $cc in
    9.0) echo "9.0a" ;;
    "") echo "8.0+PTX;9.0a" ;;
    *) echo "$cc" ;;
  esac
}

status=0
for stage in "${stages[@]}"; do
  case $stage in
    build)
      TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(arch_list)} MAX_JOBS=${MAX_JOBS:-16} \
        run_stage build 240 "$PY" -m pip install --no-build-isolation --no-deps -e . \
        && run_stage build 60 "$PY" -m margin_ops || { status=1; break; } ;;
    bench)
      run_stage bench 210 "$PY" benchmarks/run.py --out "$LOGS/bench" || status=1 ;;
    test)
      # --maxfail: a first run on a GPU should show the spread of failures, not only the first
      MARGIN_OPS_TEST_BACKENDS=cuda,triton run_stage test 150 "$PY" -m pytest -q -rs --maxfail=25 \
        -o faulthandler_timeout=120 tests/conformance tests/test_cuda.py || status=1 ;;
    sanitize)
      run_stage sanitize 60 sanitizer_case memcheck || status=1
      run_stage sanitize 60 sanitizer_case racecheck || status=1 ;;
    profile)
      run_stage profile 90 profile_case || status=1 ;;
    bench-fp32)
      run_stage bench-fp32 200 "$PY" benchmarks/run.py --shapes ms1mv2 webface42m-8gpu --dtypes fp32 \
        --fp32-precision high --out "$LOGS/bench-fp32" || status=1 ;;
    bench-v2)
      run_stage bench-v2 200 "$PY" benchmarks/run.py --shapes ms1mv2 1m --margins adaface subcenter-arcface \
        --contenders cuda triton eager compile --out "$LOGS/bench-v2" || status=1 ;;
    suite)
      run_stage suite 200 "$PY" -m pytest -q -m "not slow" tests --ignore=tests/test_cuda.py || status=1 ;;
    dist)
      run_stage dist 200 "$PY" benchmarks/distributed_overhead.py || status=1 ;;
    *)
      echo "unknown stage $stage (build, bench, test, sanitize, profile, bench-fp32, bench-v2, suite, dist)" >&2
      exit 2 ;;
  esac
done
exit "$status"
