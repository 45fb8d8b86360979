"""Whole-model quality: WikiText-2 perplexity of SmolLM2-135M-Instruct quantized by rtn / gptq / quantease.

usage: .venv/bin/python benchmarks/quality.py [--nsamples 128] [--eval-limit N] [--configs a,b,...]
Each config: `quantize_model` (calibration: random 2048-token windows of c4_sample.jsonl), then perplexity
(GPTQ convention, seqlen 2048) of the written checkpoint, dequantized to a dense model (same function as the
runtime's quantized linears).  Results accumulate in --json (a rerun skips configs already there) and the
markdown table is rewritten after every config, so an interrupted run still leaves a table.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUANTEASE_SHARED", ROOT.parent / "shared"))

# name -> quantize_model options (None: the fp16 model itself); in the order they run (most telling first)
CONFIGS = {
    "fp16": None,
    "rtn-3": dict(method="rtn", bits=3),
    "gptq-3": dict(method="gptq", bits=3),
    "quantease-3": dict(method="quantease", bits=3, outliers=0.0),
    "quantease-3+1%": dict(method="quantease", bits=3, outliers=0.01),
    "quantease-3+0.5%": dict(method="quantease", bits=3, outliers=0.005),
    "rtn-4": dict(method="rtn", bits=4),
    "gptq-4": dict(method="gptq", bits=4),
    "quantease-4": dict(method="quantease", bits=4, outliers=0.0),
    "gptq-3-g128": dict(method="gptq", bits=3, group_size=128),
    "quantease-3-g128": dict(method="quantease", bits=3, group_size=128, outliers=0.0),
}


def run_config(name, opts, args, work):
    from quantease.eval import evaluate
    from quantease.quantize.pipeline import quantize_model

    if opts is None:
        res = evaluate(args.model, args.data, seqlen=2048, limit=args.eval_limit, device=args.device)
        return dict(name=name, ppl=res["ppl"], windows=res["windows"], bits_per_weight=16.0, seconds=0.0,
                    quant_seconds=0.0)
    out = work / name
    report = quantize_model(args.model, out, calib_spec=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                            device=args.device, seed=0, overwrite=True, **opts)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    res = evaluate(out, args.data, seqlen=2048, limit=args.eval_limit, device=args.device, dense=True)
    return dict(name=name, ppl=res["ppl"], windows=res["windows"], bits_per_weight=qc["bits_per_weight"],
                seconds=report["seconds"], quant_seconds=sum(r["seconds"] for r in report["layers"].values()),
                mean_rel_error=sum(r["rel_error"] for r in report["layers"].values()) / len(report["layers"]))


def targets(rows):
    by = {r["name"]: r["ppl"] for r in rows}
    lines = []
    if {"fp16", "gptq-3", "quantease-3"} <= by.keys():
        g, q = by["gptq-3"] - by["fp16"], by["quantease-3"] - by["fp16"]
        ok = q <= 0.9 * g
        lines.append(f"- quantease 3-bit excess ppl {q:.3f} vs gptq 3-bit {g:.3f}: {100 * (1 - q / g):.1f}% smaller "
                     f"(target >= 10%: {'met' if ok else 'NOT met'})")
    if {"fp16", "gptq-3", "quantease-3+1%"} <= by.keys():
        g, q = by["gptq-3"] - by["fp16"], by["quantease-3+1%"] - by["fp16"]
        closed = 1 - q / g
        lines.append(f"- quantease 3-bit + 1% outliers closes {100 * closed:.1f}% of gptq 3-bit's gap to fp16 "
                     f"(target >= 60%: {'met' if closed >= 0.6 else 'NOT met'})")
    return lines


def write_md(rows, args, path):
    cpu = platform.processor() or platform.machine()
    lines = [
        "## Whole-model quality (issue 4): SmolLM2-135M-Instruct, WikiText-2 perplexity",
        "",
        f"Command: `.venv/bin/python benchmarks/quality.py --nsamples {args.nsamples} --seqlen {args.seqlen} "
        f"--eval-limit {args.eval_limit}`  ",
        (f"Machine: CPU only ({os.cpu_count()} cores, {cpu}, torch {torch.__version__}, float32 compute), shared "
         f"with other jobs; " if args.device == "cpu" else f"Device: {args.device}; ")
        + f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
        f"Calibration: {args.nsamples} random windows x {args.seqlen} tokens of c4_sample.jsonl (seed 0); "
        f"all linears of a block from one pass (not true-sequential).  ",
        "Eval: WikiText-2 raw test rows joined with \"\\n\\n\", non-overlapping 2048-token windows, "
        + ("all windows" if args.eval_limit is None else f"first {args.eval_limit} windows only (CPU time)")
        + "; quantized checkpoints are dequantized to dense weights for the forward.  ",
        "Per-channel (g=-1) asymmetric grids unless g128; outliers: fraction of weights kept in fp16 (ELL slots).  ",
        "time = whole `quantize_model` run (calibration forwards + quantization); quant s = sum over layers of "
        "quantize_weight time.",
        "",
        "| config | bits/weight | ppl | excess over fp16 | mean layer rel err | time (s) | quant s |",
        "|---|---|---|---|---|---|---|",
    ]
    fp = next((r["ppl"] for r in rows if r["name"] == "fp16"), None)
    for r in rows:
        excess = f"{r['ppl'] - fp:+.3f}" if fp is not None and r["name"] != "fp16" else ""
        rel = f"{r['mean_rel_error']:.4f}" if "mean_rel_error" in r else ""
        lines.append(f"| {r['name']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {excess} | {rel} | "
                     f"{r['seconds']:.0f} | {r['quant_seconds']:.0f} |")
    missing = [n for n in args.configs if n not in {r["name"] for r in rows}]
    lines += ["", "Targets:"] + (targets(rows) or ["- (not enough configs finished yet)"])
    if missing:
        lines += ["", f"Not finished in this session: {', '.join(missing)}."]
    if args.note:
        lines += ["", args.note]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / ".cache/smollm2-135m-instruct"))
    p.add_argument("--calib", default=str(SHARED / "data/c4/c4_sample.jsonl"))
    p.add_argument("--data", default=str(SHARED / "data/wikitext2/wiki.test.raw"))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval-limit", type=int, default=None, help="first N WikiText-2 windows only")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from " + ", ".join(CONFIGS).replace("%", "%%"))
    p.add_argument("--work", default=str(ROOT / ".dev/quality"), help="where checkpoints are written")
    p.add_argument("--json", default=None, help="results file (default: WORK/results.json)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/quality.md"))
    p.add_argument("--device", default="cpu", help="cpu or cuda (quantization and eval)")
    p.add_argument("--render", action="store_true", help="only rewrite the markdown from the results file")
    p.add_argument("--note", default="", help="a status paragraph appended to the markdown")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config, print its row
    args = p.parse_args()
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    jpath = Path(args.json or work / "results.json")
    rows = json.loads(jpath.read_text()) if jpath.exists() else []
    if args.render:
        write_md(rows, args, Path(args.out))
        return
    if args.one:
        print("ROW " + json.dumps(run_config(args.one, CONFIGS[args.one], args, work)), flush=True)
        return
    for name in args.configs:
        if any(r["name"] == name for r in rows):
            continue
        print(f"=== {name} ({time.strftime('%H:%M:%S')})", flush=True)
        # a fresh process per config: each one runs one consistent snapshot of the code
        argv = [sys.executable, __file__, "--one", name] + [a for a in sys.argv[1:]]
        proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        sys.stdout.write(proc.stdout)
        found = [ln[4:] for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
        if proc.returncode or not found:
            print(f"=== {name} failed (rc {proc.returncode})", flush=True)
            continue
        row = json.loads(found[-1])
        rows.append(row)
        jpath.write_text(json.dumps(rows, indent=1))
        write_md(rows, args, Path(args.out))
    write_md(rows, args, Path(args.out))


if __name__ == "__main__":
    main()
