"""Quantization time of the whole `quantease quantize` pipeline on the Llama-3-8B shape: gptq vs quantease.

    python3 benchmarks/quant_time.py --blocks 2 --out $OUT                      # GPU: 8B-shape blocks
    .venv/bin/python benchmarks/quant_time.py --tiny --out /tmp/qt             # CPU smoke run

A full 8B run per method does not fit the device budget, so the model is the Llama-3-8B architecture cut to
--blocks decoder blocks (same embeddings, lm_head and block shapes; synthetic random weights, made where it
runs) and the 32-block time is EXTRAPOLATED: fixed part (load, calibration, checkpoint write, measured on the
cut model) + 32 x the mean per-block time (blocks after the first when there are several: the first one also
pays one-off kernel compiles).  Calibration: nsamples x seqlen random token ids, fed through the pipeline's own
--calib path as a text of words of a word-level tokenizer whose vocabulary is the model's (token i = "t<i>").

Each method runs `quantize_model` (the CLI's Python API) in its own process; per-block wall times come from
timestamps around the pipeline's quantize_block / save_block (Σ accumulation + quantization + block outputs +
the resume state it saves), per-layer quantize_weight seconds from the checkpoint report, peak GPU memory from
torch.cuda.max_memory_allocated.  A method cut short by --deadline keeps the blocks it finished.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
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

    marks, state = [], {}

    def dump(status):
        Path(args.json).write_text(json.dumps(dict(method=args.one, status=status, blocks=marks, **state), indent=1))

    orig_qb, orig_save = pipeline.quantize_block, pipeline.save_block

    def quantize_block(*a, **k):
        sync()
        marks.append(dict(start=time.time()))
        out = orig_qb(*a, **k)
        sync()
        marks[-1]["quantized"] = time.time()
        return out

    def save_block(pdir, fingerprint, i, results, rows, *rest):  # rest: the next block's inputs (both streams)
        sync()
        marks[-1]["outputs"] = time.time()
        orig_save(pdir, fingerprint, i, results, rows, *rest)
        m = marks[-1]
        m.update(end=time.time(), block=i, quantize_weight_s=sum(r["seconds"] for r in rows.values()))
        m.update(seconds=m["end"] - m["start"], save_s=m["end"] - m["outputs"])
        state["peak_gib"] = peak_gib()
        dump("running")

    pipeline.quantize_block, pipeline.save_block = quantize_block, save_block
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    state["start"] = t0
    dump("running")
    opts = dict(METHODS[args.one])
    pipeline.quantize_model(args.model, args.qout, calib_spec=args.calib, nsamples=args.nsamples,
                            seqlen=args.seqlen, device=args.device, seed=0, overwrite=True, progress=True, **opts)
    state.update(total_s=time.time() - t0, peak_gib=peak_gib())
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
               peak_gib=res.get("peak_gib"), calib=calib)
    if not done:
        return row
    steady = done[1:] if len(done) > 1 else done
    per_block = sum(b["seconds"] for b in steady) / len(steady)
    row.update(per_block_s=per_block, first_block_s=done[0]["seconds"],
               quantize_weight_s=sum(b["quantize_weight_s"] for b in steady) / len(steady),
               save_s=sum(b["save_s"] for b in steady) / len(steady), blocks_used=len(steady))
    if res["status"] == "done":
        fixed = res["total_s"] - sum(b["seconds"] for b in done)
        row.update(total_s=res["total_s"], fixed_s=fixed,
                   extrapolated_32_s=fixed + done[0]["seconds"] + (FULL_BLOCKS - 1) * per_block)
    return row


def fmt(x, spec):
    return "" if x is None else format(x, spec)


def table(rows):
    lines = ["| method | blocks timed | s / block (mean) | first block s | quantize_weight s / block | save s / block "
             "| fixed s | cut-model total s | 32-block total (extrapolated) | peak GPU GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ext = r.get("extrapolated_32_s")
        lines.append(f"| {r['method']} | {r['blocks_done']}/{r['blocks_model']} ({r['status']}) | "
                     f"{fmt(r.get('per_block_s'), '.1f')} | {fmt(r.get('first_block_s'), '.1f')} | "
                     f"{fmt(r.get('quantize_weight_s'), '.1f')} | {fmt(r.get('save_s'), '.1f')} | "
                     f"{fmt(r.get('fixed_s'), '.1f')} | {fmt(r.get('total_s'), '.1f')} | "
                     f"{'' if ext is None else f'{ext:.0f} s = {ext / 60:.1f} min'} | {fmt(r.get('peak_gib'), '.1f')} |")
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
    calib = make_model(work / "model", args.blocks, args.tiny, args.nsamples, args.seqlen)
    print(f"[quant_time] cut model ({args.blocks} blocks) + calibration text in {time.time() - t0:.0f}s", flush=True)
    rows = []
    for m in methods:
        left = None if args.deadline is None else args.deadline - time.time()
        if left is not None and left < 30:
            print(f"[quant_time] {m}: skipped, {left:.0f}s left before the deadline")
            continue
        js = out / f"quant_time_{m.replace('+', '_')}.json"
        cmd = [sys.executable, __file__, "--one", m, "--model", str(work / "model"), "--calib", str(calib),
               "--qout", str(work / f"q_{m.replace('+', '_')}"), "--json", str(js),
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
        cmd += ["--device", args.device] if args.device else []
        t = time.time()
        try:
            rc = subprocess.run(cmd, timeout=left).returncode
        except subprocess.TimeoutExpired:
            rc = "deadline"
        print(f"[quant_time] {m}: rc={rc} after {time.time() - t:.0f}s", flush=True)
        if js.exists():
            res = json.loads(js.read_text())
            if rc != 0 and res["status"] != "done":
                res["status"] = f"cut ({rc})"
            rows.append(summarize(res, args.blocks, f"{args.nsamples} x {args.seqlen}"))
        shutil.rmtree(work / f"q_{m.replace('+', '_')}", ignore_errors=True)
        shutil.rmtree(work / f"q_{m.replace('+', '_')}.partial", ignore_errors=True)
        with open(out / "quant_time.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)
    shape = "tiny Llama" if args.tiny else "Llama-3-8B shape"
    print(f"\nQuantization time, {shape} cut to {args.blocks} blocks, {args.nsamples} x {args.seqlen} "
          f"calibration tokens; 32-block totals are EXTRAPOLATED (fixed + first + 31 x mean of later blocks):")
    print(table(rows))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
