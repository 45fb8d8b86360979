#!/bin/bash
# Device call 3 (after install.sh of p1, p2): assemble the SmolLM2 checkpoint, serve it with vLLM 0.26 +
# quantease kernels (CUDA graphs on), greedy check vs transformers, 64-client load test.
set -o pipefail
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
T0=$(date +%s); ts(){ echo "[t+$(( $(date +%s)-T0 ))s] $*"; }
nvidia-smi -L; python3 -c 'import vllm, torch, triton, transformers; print("vllm", vllm.__version__, "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
python3 -c 'import quantease.runtime.vllm_plugin as p; p.register(); from vllm.model_executor.layers.quantization import get_quantization_config as g; print("quant config:", g("quantease"))' || exit 1
cat /tmp/qeparts/c.* | tar -xf - -C /tmp && python3 .dev/serve/assemble.py /tmp/ckparts /tmp/smollm2-qe3 || exit 1
ts "serve start"
setsid python3 -m quantease.cli serve /tmp/smollm2-qe3 --port 8011 --gpu-memory-utilization 0.3 --max-model-len 2048 > $OUT/serve.log 2>&1 &
SP=$!
for i in $(seq 1 400); do curl -sf http://127.0.0.1:8011/health >/dev/null && break; kill -0 $SP 2>/dev/null || break; sleep 1; done
ts "health loop ended"; curl -sf http://127.0.0.1:8011/health >/dev/null || { tail -60 $OUT/serve.log; kill -9 -- -$SP; exit 1; }
grep -iE "quantease|cuda graph|cudagraph|compil|backend|enforce|KV cache|Graph capturing" $OUT/serve.log | grep -v Route | cut -c1-220 | head -30
[ -n "$SKIP_CHECK" ] || ts "greedy check"; [ -n "$SKIP_CHECK" ] || python3 .dev/serve/check.py http://127.0.0.1:8011 /tmp/smollm2-qe3 $OUT/greedy.json 2>&1 | grep -v Warning | tail -12
ts "load"; python3 benchmarks/serve_load.py http://127.0.0.1:8011/v1 --clients 64 --duration ${LOAD_S:-120} --max-tokens 128 --drain 120 --json $OUT/load.json
ts "load done"; grep -E "ERROR|Traceback" $OUT/serve.log | head -5
kill -INT $SP 2>/dev/null; sleep 5; kill -9 -- -$SP 2>/dev/null; ts done
