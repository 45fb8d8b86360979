"""Quantization time of the whole `quantease quantize` pipeline on the Llama-3-8B shape: gptq vs quantease.

    python3 benchmarks/quant_time.py --blocks 2 --out $OUT                      # GPU: 8B-shape blocks
    .venv/bin/python benchmarks/quant_time.py --tiny --out /tmp/qt             # CPU smoke run
    S=$(date +%s); python3 benchmarks/quant_time.py --resume --blocks 32 --methods quantease \
        --work /tmp/qtfull --out $OUT --deadline $((S + 570))                  # GPU: the whole model, measured

--resume keeps --work between calls: the same line, run again on the same (warm) machine, reuses the model and
continues a method cut by the deadline at the pipeline's last saved block; the method's time is then the sum of
its calls (each resume pays one more model load and calibration capture, ~15-20 s on the H200).  Session 8 (H200):
the whole 8B shape took 30 s to make, then quantease 755 s over 2 calls and gptq 370 s over 2 (results/throughput.md).

With --blocks below 32 (a quick run: a whole 8B run per method takes one or two device calls), the model is the
Llama-3-8B architecture cut to --blocks decoder blocks (same embeddings, lm_head and block shapes; synthetic random
weights, made where it runs) and the 32-block time is EXTRAPOLATED: fixed part (load, calibration, checkpoint
write, measured on the cut model) + 32 x the mean per-block time (blocks after the first when there are several:
the first one also pays one-off kernel compiles). Calibration: nsamples x seqlen random token ids, fed through the
pipeline's own --calib path as a text of words of a word-level tokenizer whose vocabulary is the model's (token i =
"t<i>").

Each method runs `quantize_model` (the CLI's Python API) in its own process; a block's wall time runs from its
quantize_block to the next block's (Σ accumulation + quantization + block outputs, and any wait for the previous
block's resume state, which the pipeline saves on a thread beside the next block), per-layer quantize_weight
seconds from the checkpoint report, peak GPU memory from torch.cuda.max_memory_allocated. A method cut short by
--deadline keeps the blocks it finished.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = {  # label -> quantize_model options
    "gptq": dict(method="gptq", bits=3, outliers=0.0),
    "quantease": dict(method="quantease", bits=3, outliers=0.0, sweeps=5),
    "quantease+outliers": dict(method="quantease", bits=3, outliers=0.005, sweeps=5),
}
FULL_BLOCKS = 32


# ---------------------------------------------------------------- the cut model, tokenizer and calibration text

def make_model(out, blocks, tiny, nsamples, seqlen, seed=0):
    """fp16 HF folder (8B shape cut to `blocks`) + word-level tokenizer + calibration text; returns the text path."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import throughput as tp

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = tp.model_config(tiny)
    cfg["num_hidden_layers"] = blocks
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tp.write_config(out, cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = dict(tp.dense_tensors(cfg, gen, device))
    for prefix, w in tp.layer_weights(cfg, gen, device):
        tensors[f"{prefix}.weight"] = w.half().cpu()
    save_file(tensors, str(out / "model.safetensors"), {"format": "pt"})
    vocab = cfg["vocab_size"]
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(out)
    ids = torch.randint(0, vocab, (nsamples * seqlen + seqlen,), generator=torch.Generator().manual_seed(seed))
    text = out / "calib.txt"
    text.write_text(" ".join(f"t{i}" for i in ids.tolist()))
    del tensors
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the children need the GPU
    return text


# ---------------------------------------------------------------- one method (child process)

def run_one(args):
    from quantease.quantize import pipeline

    marks, state = [], {"calls": []}
    prev = json.loads(Path(args.json).read_text()) if args.resume and Path(args.json).exists() else None
    if prev is not None and prev["status"] != "done":  # an earlier call was cut: keep its finished blocks
        marks = [b for b in prev["blocks"] if "end" in b]
        state.update(calls=prev.get("calls", []), peak_gib=prev.get("peak_gib"))
    call = dict(first_block=len(marks))
    state["calls"].append(call)

    lock = threading.Lock()  # save_block runs on the pipeline's save thread: dump from both threads

    def dump(status):
        with lock:
            call["wall_s"] = time.time() - t0  # this call so far; total_s = every call's wall time
            state["total_s"] = sum(c.get("wall_s", 0.0) for c in state["calls"])
            tmp = Path(args.json + ".tmp")  # the parent may kill this process at its deadline: never a torn file
            tmp.write_text(json.dumps(dict(method=args.one, status=status, blocks=marks, **state), indent=1))
            os.replace(tmp, args.json)

    orig_qb, orig_save = pipeline.quantize_block, pipeline.save_block
    mine = {}  # block index -> its mark, this call's blocks

    # A block's seconds: from its quantize_block to the next one's (its Σ, quantization and outputs, and any wait
    # for the previous block's save), or to its own save's end for the call's last block.  The save itself
    # runs beside the next block (pipeline.BlockSaver): save_s is its own duration, overlapped.
    def quantize_block(block, prefix, *a, **k):
        sync()
        now = time.time()
        i = int(prefix.rsplit(".", 1)[-1])
        if i - 1 in mine:
            mine[i - 1]["seconds"] = now - mine[i - 1]["start"]
        mine[i] = dict(block=i, start=now)
        marks.append(mine[i])
        out = orig_qb(block, prefix, *a, **k)
        sync()
        mine[i]["quantized"] = time.time()
        return out

    def save_block(pdir, fingerprint, i, results, rows, *rest):  # rest: the next block's inputs (both streams)
        t = time.time()
        orig_save(pdir, fingerprint, i, results, rows, *rest)
        m = mine[i]
        m.update(end=time.time(), save_s=time.time() - t, quantize_weight_s=sum(r["seconds"] for r in rows.values()))
        m["sigma_s"] = m["quantized"] - m["start"] - m["quantize_weight_s"]
        m.setdefault("seconds", m["end"] - m["start"])
        state["peak_gib"] = max(filter(None, (state.get("peak_gib"), peak_gib())), default=None)
        dump("running")

    pipeline.quantize_block, pipeline.save_block = quantize_block, save_block
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    call["start"] = t0
    dump("running")
    opts = dict(METHODS[args.one])
    # the pipeline resumes from its partial folder by itself when the model files and options are unchanged
    pipeline.quantize_model(args.model, args.qout, calib_spec=args.calib, nsamples=args.nsamples,
                            seqlen=args.seqlen, device=args.device, seed=0, overwrite=True, progress=True, **opts)
    state["peak_gib"] = max(filter(None, (state.get("peak_gib"), peak_gib())), default=None)
    dump("done")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 1024 ** 3 if torch.cuda.is_available() else None


# ---------------------------------------------------------------- parent: run methods, extrapolate, table

def summarize(res, nblocks, calib):
    """Row of the table from one method's JSON: per-block mean, fixed part, extrapolated 32-block total."""
    done = [b for b in res.get("blocks", []) if "end" in b]
    row = dict(method=res["method"], status=res["status"], blocks_done=len(done), blocks_model=nblocks,
               peak_gib=res.get("peak_gib"), calib=calib, calls=len(res.get("calls", [None])))
    if not done:
        return row
    steady = done[1:] if len(done) > 1 else done
    per_block = sum(b["seconds"] for b in steady) / len(steady)
    row.update(per_block_s=per_block, first_block_s=done[0]["seconds"],
               quantize_weight_s=sum(b["quantize_weight_s"] for b in steady) / len(steady),
               save_s=sum(b["save_s"] for b in steady) / len(steady), blocks_used=len(steady))
    if all("sigma_s" in b for b in steady):  # runs before the save thread did not record it
        row["sigma_s"] = sum(b["sigma_s"] for b in steady) / len(steady)
    if res["status"] == "done":
        fixed = res["total_s"] - sum(b["seconds"] for b in done)
        row.update(total_s=res["total_s"], fixed_s=fixed,
                   extrapolated_32_s=fixed + done[0]["seconds"] + (FULL_BLOCKS - 1) * per_block)
        if nblocks == FULL_BLOCKS:  # the whole model ran: its total is measured (a resume pays one more load)
            row["measured_32_s"] = res["total_s"]
    return row


def fmt(x, spec):
    return "" if x is None else format(x, spec)


def table(rows):
    lines = ["| method | blocks timed | s / block (mean) | first block s | quantize_weight s / block | Σ + hooks s / block "
             "| save s / block (overlapped) | fixed s | cut-model total s | 32-block total (extrapolated, or measured) "
             "| peak GPU GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ext, meas = r.get("extrapolated_32_s"), r.get("measured_32_s")
        total = (f"{meas:.0f} s = {meas / 60:.1f} min MEASURED ({r['calls']} call(s))" if meas is not None else
                 "" if ext is None else f"{ext:.0f} s = {ext / 60:.1f} min")
        lines.append(f"| {r['method']} | {r['blocks_done']}/{r['blocks_model']} ({r['status']}) | "
                     f"{fmt(r.get('per_block_s'), '.1f')} | {fmt(r.get('first_block_s'), '.1f')} | "
                     f"{fmt(r.get('quantize_weight_s'), '.1f')} | {fmt(r.get('sigma_s'), '.1f')} | "
                     f"{fmt(r.get('save_s'), '.1f')} | "
                     f"{fmt(r.get('fixed_s'), '.1f')} | {fmt(r.get('total_s'), '.1f')} | "
                     f"{total} | {fmt(r.get('peak_gib'), '.1f')} |")
    by = {r["method"]: r.get("per_block_s") for r in rows}
    if by.get("gptq") and by.get("quantease"):
        lines.append(f"\nquantease / gptq time per block: {by['quantease'] / by['gptq']:.2f}x (target <= 3x)")
    if by.get("gptq") and by.get("quantease+outliers"):
        lines.append(f"quantease+outliers / gptq time per block: {by['quantease+outliers'] / by['gptq']:.2f}x")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny Llama, few samples (CPU smoke test)")
    p.add_argument("--blocks", type=int, default=2, help="decoder blocks of the cut 8B-shape model")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    p.add_argument("--nsamples", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--work", default="/tmp/quantease-quant-time")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--deadline", type=float, default=None, help="unix time by which every method must stop")
    p.add_argument("--resume", action="store_true",
                   help="keep --work between calls: reuse its model, continue a method cut by a deadline (the "
                        "pipeline resumes at its last saved block) and add this call's time to it")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child: run this method
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--calib", help=argparse.SUPPRESS)
    p.add_argument("--qout", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.nsamples = args.nsamples or (8 if args.tiny else 128)
    args.seqlen = args.seqlen or (64 if args.tiny else 2048)
    if args.one:
        return run_one(args)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        sys.exit(f"unknown methods {bad}; choose from {list(METHODS)}")
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    made = dict(blocks=args.blocks, tiny=args.tiny, nsamples=args.nsamples, seqlen=args.seqlen)
    stamp = work / "model.json"
    if args.resume and stamp.exists() and json.loads(stamp.read_text()) == made:
        calib = work / "model" / "calib.txt"  # the same files (same mtimes): the pipeline's resume accepts them
        print(f"[quant_time] --resume: reusing {work / 'model'}", flush=True)
    else:
        stamp.unlink(missing_ok=True)
        for old in work.glob("quant_time_*.json"):  # timings of another model
            old.unlink()
        calib = make_model(work / "model", args.blocks, args.tiny, args.nsamples, args.seqlen)
        stamp.write_text(json.dumps(made))
        print(f"[quant_time] cut model ({args.blocks} blocks) + calibration text in {time.time() - t0:.0f}s",
              flush=True)
    rows = []
    for m in methods:
        tag = m.replace("+", "_")
        js = work / f"quant_time_{tag}.json"  # in the work folder: a --resume call (new $OUT) continues it
        res = json.loads(js.read_text()) if args.resume and js.exists() else None
        left = None if args.deadline is None else args.deadline - time.time()
        if res is not None and res["status"] == "done":
            print(f"[quant_time] {m}: done by an earlier call", flush=True)
        elif left is not None and left < 30:
            print(f"[quant_time] {m}: skipped, {left:.0f}s left before the deadline")
            continue
        else:
            if not args.resume:
                js.unlink(missing_ok=True)
            cmd = [sys.executable, __file__, "--one", m, "--model", str(work / "model"), "--calib", str(calib),
                   "--qout", str(work / f"q_{tag}"), "--json", str(js),
                   "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
            cmd += ["--device", args.device] if args.device else []
            cmd += ["--resume"] if args.resume else []
            t = time.time()
            try:
                rc = subprocess.run(cmd, timeout=left).returncode
            except subprocess.TimeoutExpired:
                rc = "deadline"
            print(f"[quant_time] {m}: rc={rc} after {time.time() - t:.0f}s", flush=True)
            res = json.loads(js.read_text()) if js.exists() else None
            if res is not None and rc != 0 and res["status"] != "done":
                res["status"] = f"cut ({rc})"
                js.write_text(json.dumps(res, indent=1))
        if res is not None:
            shutil.copy(js, out / js.name)
            rows.append(summarize(res, args.blocks, f"{args.nsamples} x {args.seqlen}"))
        if not args.resume or (res is not None and res["status"] == "done"):  # --resume keeps a cut run's state
            shutil.rmtree(work / f"q_{tag}", ignore_errors=True)
            shutil.rmtree(work / f"q_{tag}.partial", ignore_errors=True)
        with open(out / "quant_time.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)
    shape = "tiny Llama" if args.tiny else "Llama-3-8B shape"
    how = ("the whole model ran: totals MEASURED (over every call of a --resume run)" if args.blocks == FULL_BLOCKS
           else "32-block totals are EXTRAPOLATED (fixed + first + 31 x mean of later blocks)")
    print(f"\nQuantization time, {shape} cut to {args.blocks} blocks, {args.nsamples} x {args.seqlen} "
          f"calibration tokens; {how}:")
    print(table(rows))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
