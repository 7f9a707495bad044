#!/usr/bin/env bash
# Every check that needs a GPU, for one lent GPU machine (see README "Building for GPU").
#
#   bash benchmarks/gpu_session.sh [STAGE ...]      default: build test sanitize
#
# Stages (a fresh machine needs `build` first in every call):
#   build     pip install --no-build-isolation -e . (the C++/CUDA extension, in place),
#             then `python -m margin_ops` (which backends this install has)
#   test      the GPU tests: the conformance suite on the 'cuda' and 'triton' backends and
#             tests/test_cuda.py (both GPU backends), then the whole suite as a regression check
#   sanitize  compute-sanitizer memcheck and racecheck on a small forward + backward of
#             every margin in bf16 and fp32 through the CUDA backend
#   bench     python benchmarks/run.py on the named shapes (bf16), then fp32 under "high"
#             on ms1mv2 and webface42m-8gpu
#   bench-v2  the margin family v2 rows: AdaFace and sub-center ArcFace (K = 3) on ms1mv2
#             and 1m, bf16, against torch.compile and eager
#   dist      benchmarks/distributed_overhead.py at world size 1 (NCCL)
#
# Outputs, in $OUT (the device tool's folder that comes back) or else gpu-out/, written as
# the stages run so that a call cut off at its time limit still reports: <stage>.log,
# bench/results.{md,json,png} (bf16), bench-fp32/results.{md,json,png} and
# bench-v2/results.{md,json,png}. The device tool brings back 8 files a call: run
# `build test sanitize` in one call, `build bench` in another, `build bench-v2` in a third.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${OUT:-gpu-out}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
stages=("$@")
((${#stages[@]})) || stages=(build test sanitize)

run_stage() {  # name, command...: runs the command, its output to the terminal and the log
  local name=$1
  shift
  echo "== $name: $*" | tee -a "$LOGS/$name.log"
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOGS/$name.log"
  return "$rc"
}

sanitizer_case() {  # tool: one small fused forward + backward per margin and dtype
  compute-sanitizer --tool "$1" --error-exitcode 1 "$PY" - <<'EOF'
import torch
import margin_ops

torch.manual_seed(0)
with margin_ops.backend("cuda"):
    for dtype in (torch.bfloat16, torch.float32):
        # odd sizes: a partial row tile, a partial class tile, D not a multiple of 8
        x = torch.randn(37, 45, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(1009, 45, device="cuda", dtype=dtype, requires_grad=True)
        y = torch.randint(0, 1009, (37,), device="cuda")
        y[3] = -100
        for name, kwargs in [("arcface", {}), ("cosface", {}), ("combined", {}),
                             ("sphereface", dict(m=4, lamb=5.0))]:
            loss = getattr(torch.ops.margin, name)(x, w, y, **kwargs)
            loss.backward()
            torch.cuda.synchronize()
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
            x.grad = w.grad = None
        print(dtype, "ok")
EOF
}

status=0
for stage in "${stages[@]}"; do
  case $stage in
    build)
      MAX_JOBS=${MAX_JOBS:-16} run_stage build "$PY" -m pip install --no-build-isolation --no-deps -e . \
        && run_stage build "$PY" -m margin_ops || { status=1; break; } ;;
    test)
      # --maxfail: a first run on a GPU should show the spread of failures, not only the first
      MARGIN_OPS_TEST_BACKENDS=cuda,triton run_stage test "$PY" -m pytest -q -rs --maxfail=25 \
        -o faulthandler_timeout=240 tests/conformance tests/test_cuda.py || status=1
      run_stage test "$PY" -m pytest -q -m "not slow" tests --ignore=tests/test_cuda.py || status=1 ;;
    sanitize)
      run_stage sanitize sanitizer_case memcheck || status=1
      run_stage sanitize sanitizer_case racecheck || status=1 ;;
    bench)
      run_stage bench "$PY" benchmarks/run.py --out "$LOGS/bench" || status=1
      run_stage bench "$PY" benchmarks/run.py --shapes ms1mv2 webface42m-8gpu --dtypes fp32 \
        --fp32-precision high --out "$LOGS/bench-fp32" || status=1 ;;
    bench-v2)
      run_stage bench-v2 "$PY" benchmarks/run.py --shapes ms1mv2 1m --margins adaface subcenter-arcface \
        --contenders cuda triton eager compile --out "$LOGS/bench-v2" || status=1 ;;
    dist)
      run_stage dist "$PY" benchmarks/distributed_overhead.py || status=1 ;;
    *)
      echo "unknown stage $stage (build, test, sanitize, bench, bench-v2, dist)" >&2
      exit 2 ;;
  esac
done
exit "$status"
