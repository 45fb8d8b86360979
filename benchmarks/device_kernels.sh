#!/bin/bash
# Device (H100 / H200) kernel call of issue 5, one command: the GPU check of the kernels under test, then their
# timings, each step bounded so that the call ends inside the device's per-call limit.  From the repo root:
#   bash benchmarks/device_kernels.sh      ($OUT gets machine.txt, check.log, xpf/, of/, ws/ and each step's log)
# Env: P1=1 also unpacks the vLLM payload's first part in the background (carry [".dev/p1", ".dev/kit"]), so that
#      the vLLM call (benchmarks/device_e2e.sh after `install.sh .dev/p2`) can follow on the same warm machine.
# Steps (kernel_notes "Session 15", then "Session 14"): the cross-layer L2 prefetch on a synthetic Llama-3-8B decode
# step at M = 1 / 8 / 32 (xprefetch.py: off, 8-32 MiB, from all programs, per line, PDL alone and with 16 MiB,
# fp16 beside);
# gemm_half2's OF variants against the table's outlier epilogue at M = 4 / 16 / 32 on five shapes
# (kernels_half2.py --outliers); ws_probe.py (the TMA stream and the first warp-specialized GEMV).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s); ts() { echo "[t+$(( $(date +%s) - T0 ))s] $*"; }
if [ "${P1:-0}" = 1 ]; then (bash .dev/kit/install.sh .dev/p1 > $OUT/p1.log 2>&1; echo "rc $?" >> $OUT/p1.log) & fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u; } \
  2>&1 | tee $OUT/machine.txt
ts "GPU check"
timeout 120 python3 -m pytest -q -x tests/test_kernels_xprefetch.py tests/test_kernels_gemm_half2.py \
  -k "xprefetch or before_the_k_loop or tiles_and_splits or zero_scales" 2>&1 | tail -3 | tee $OUT/check.log
ts "cross-layer prefetch"
timeout 170 python3 benchmarks/xprefetch.py --ms 1,8,32 --caps 8,16,32,16:all,16:lines --pdl 16 --deadline 140 \
  --out $OUT/xpf 2>&1 | grep -v Warning | tee $OUT/xpf.log
ts "OF variants"
timeout 170 python3 benchmarks/kernels_half2.py --outliers --variants pf_all,table,fused,of1,of2,of_all,of2_br4 \
  --outlier-ms 4,16,32 --shapes 8192x8192,28672x8192,4096x11008,4096x4096,8192x28672 --deadline 90 \
  --out $OUT/of 2>&1 | grep -v Warning | tee $OUT/of.log
ts "ws_probe"
timeout 150 python3 benchmarks/ws_probe.py --out $OUT/ws 2>&1 | grep -v Warning | tee $OUT/ws.log
wait
[ "${P1:-0}" = 1 ] && tail -1 $OUT/p1.log
ts "done"
