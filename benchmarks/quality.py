"""Whole-model quality: WikiText-2 perplexity of SmolLM2-135M-Instruct quantized by rtn / gptq / quantease.

usage: .venv/bin/python benchmarks/quality.py [--nsamples 128] [--eval-limit N] [--configs a,b,...]
       python3 benchmarks/quality.py --device cuda --in-process ...   (the GPU run: benchmarks/device_quality.sh)
Each config: `quantize_model` (calibration: random 2048-token windows of c4_sample.jsonl), then perplexity
(GPTQ convention, seqlen 2048) of the written checkpoint, dequantized to a dense model (same function as the
runtime's quantized linears).  Results accumulate in --json, one row per (config, code hash, protocol): a
rerun skips the configs that already have a row for the code it runs, so runs of several code versions merge
into one table whose "code" column says which code each row used (code = sha256 of the files that decide
quality: quantease/quantize, quantease/format, quantease/eval.py; --code-label names it, and --render here also
names the hashes of recent commits; --merge adds a device run's rows).  The markdown table is rewritten after
every config, so an interrupted run still leaves a table; an existing --out file's text from its HISTORY
marker line on is kept as it is.
By default each config runs in a fresh process (on a shared tree, each one runs one consistent snapshot of
the code); --in-process runs them all in this one (a copied tree on the GPU machine: no import and CUDA start
per config), after an untimed warm-up of every method on CUDA so that no config's time holds Triton's compile.
--deadline T (unix time) starts no config that would not finish by T (1.15 x its estimate: the earlier rows'
wall time on this machine of the same config, else of its method, else the slowest config so far).
"""
import argparse
import functools
import gc
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUANTEASE_SHARED", ROOT.parent / "shared"))

# name -> quantize_model keyword arguments (None: the fp16 model itself); the default order runs the most
# telling first (the two targets need fp16, gptq-3, quantease-3 and quantease-3+1%).  Any quantize_model keyword
# may go here; a config whose keyword the code does not take fails alone (one line) and the others still run.
CONFIGS = {
    "fp16": None,
    "gptq-3": dict(method="gptq", bits=3),
    "quantease-3": dict(method="quantease", bits=3, outliers=0.0),
    "quantease-3+1%": dict(method="quantease", bits=3, outliers=0.01),
    "quantease-3+0.5%": dict(method="quantease", bits=3, outliers=0.005),
    "rtn-3": dict(method="rtn", bits=3),
    "rtn-4": dict(method="rtn", bits=4),
    "gptq-4": dict(method="gptq", bits=4),
    "quantease-4": dict(method="quantease", bits=4, outliers=0.0),
    "gptq-3-g128": dict(method="gptq", bits=3, group_size=128),
    "quantease-3-g128": dict(method="quantease", bits=3, group_size=128, outliers=0.0),
    # target (pipeline.py --target): "fp" = each layer matches the full-precision model's output (quantease's
    # default since 2026-11-24 11:20), "q" = its own quantized inputs (gptq's default); explicit rows for the comparison
    "quantease-3-q": dict(method="quantease", bits=3, outliers=0.0, target="q"),
    "quantease-3+1%-q": dict(method="quantease", bits=3, outliers=0.01, target="q"),
    "gptq-3-fpt": dict(method="gptq", bits=3, target="fp"),
    # --lm-head 4: the output layer quantized too (4 bits, the run's method, no outliers)
    "quantease-3+0.5%+head4": dict(method="quantease", bits=3, outliers=0.005, lm_head=4),
    "gptq-3+head4": dict(method="gptq", bits=3, lm_head=4),
}
# the files whose change can change a row's numbers (the kernels and the server do not: the eval is dense)
CODE_PATHS = ("quantease/quantize", "quantease/format", "quantease/eval.py")
HISTORY = "<!-- HISTORY: quality.py keeps everything from this line on as it is -->"


def files_hash(files):
    """Short sha256 of {relative path: bytes}, in path order."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + files[rel])
    return h.hexdigest()[:12]


def tree_files(paths):
    out = {}
    for rel in paths:
        p = ROOT / rel
        for f in ([p] if p.is_file() else sorted(p.rglob("*.py"))):
            out[str(f.relative_to(ROOT))] = f.read_bytes()
    return out


@functools.lru_cache(maxsize=None)
def code_hash():
    """Hash of CODE_PATHS when this process started (main() asks first): ties a row to the algorithm code
    it ran (another engineer may be changing it)."""
    return files_hash(tree_files(CODE_PATHS))


@functools.lru_cache(maxsize=None)
def tree_hash():
    """Hash of all of quantease/**/*.py (kept in each row: the exact tree, kernels included)."""
    return files_hash(tree_files(("quantease",)))


@functools.lru_cache(maxsize=None)
def commit_labels(n=15):
    """{code hash: "commit abc1234"} of the last n commits (read-only git; {} without git, e.g. on the GPU
    machine): names the rows whose code was committed."""
    def git(*a, data=None):
        return subprocess.run(["git", "-C", str(ROOT), *a], input=data, capture_output=True, check=True).stdout
    try:
        out = {}
        for c in git("log", f"-n{n}", "--format=%h").decode().split():
            listing = [ln.split(None, 3) for ln in git("ls-tree", "-r", c, "--", *CODE_PATHS).decode().splitlines()]
            blobs = [(sha, path) for _, kind, sha, path in listing if kind == "blob" and path.endswith(".py")]
            raw = git("cat-file", "--batch", data="".join(sha + "\n" for sha, _ in blobs).encode())
            files, pos = {}, 0
            for _, path in blobs:  # "<sha> blob <size>\n<bytes>\n" per blob
                nl = raw.index(b"\n", pos)
                size = int(raw[pos:nl].split()[2])
                files[path] = raw[nl + 1:nl + 1 + size]
                pos = nl + 2 + size
            out.setdefault(files_hash(files), f"commit {c}")  # newest commit first
        return out
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return {}


@functools.lru_cache(maxsize=None)
def machine_now():
    return machine(MACHINE_DEVICE[0])


MACHINE_DEVICE = ["cpu"]  # set by main()


def machine(device):
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, fp16 compute"
    cpu = platform.processor() or platform.machine()
    return f"CPU only ({os.cpu_count()} cores, {cpu}), torch {torch.__version__}, float32 compute"


def run_config(name, opts, args, work):
    from quantease.eval import evaluate
    from quantease.quantize.pipeline import quantize_model

    t0 = time.time()
    meta = dict(machine=machine(args.device), code=code_hash(), tree=tree_hash(), nsamples=args.nsamples,
                seqlen=args.seqlen, eval_limit=args.eval_limit, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if args.code_label:
        meta["code_label"] = args.code_label
    if opts is None:
        res = evaluate(args.model, args.data, seqlen=2048, limit=args.eval_limit, device=args.device)
        return dict(name=name, ppl=res["ppl"], windows=res["windows"], bits_per_weight=16.0, seconds=0.0,
                    quant_seconds=0.0, eval_seconds=res["seconds"], wall_seconds=time.time() - t0, **meta)
    out = work / name
    report = quantize_model(args.model, out, calib_spec=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                            device=args.device, seed=0, overwrite=True, **opts)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    res = evaluate(out, args.data, seqlen=2048, limit=args.eval_limit, device=args.device, dense=True)
    return dict(name=name, ppl=res["ppl"], windows=res["windows"], bits_per_weight=qc["bits_per_weight"],
                options=opts, target=report.get("target", "q"), seconds=report["seconds"],
                quant_seconds=sum(r["seconds"] for r in report["layers"].values()),
                mean_rel_error=sum(r["rel_error"] for r in report["layers"].values()) / len(report["layers"]),
                eval_seconds=res["seconds"], wall_seconds=time.time() - t0, **meta)


WARM_SHAPES = ((192, 576), (64, 1536))  # [out, in] of SmolLM2's k/v_proj and down_proj


def warm_up(device, names=None):
    """Untimed: every method of the configs `names` (default all) once on small random layers (Triton compile,
    cuBLAS/cuSOLVER start).  Only quantize_weight's options count here (target and the like are the
    pipeline's); a failure is one line (the config itself will fail the same way later, alone)."""
    from quantease.quantize import quantize_weight

    t0 = time.time()
    gen = torch.Generator().manual_seed(0)
    kinds = {}
    for name in names or CONFIGS:
        o = dict(CONFIGS[name] or {})
        if o:
            kw = dict(method=o.pop("method"), bits=o.pop("bits"), outlier_fraction=o.pop("outliers", 0.0),
                      group_size=o.pop("group_size", -1))
            kinds.setdefault(tuple(sorted(kw.items())), (name, kw))
    for n, k in WARM_SHAPES:
        w = torch.randn(n, k, generator=gen).to(device)
        x = torch.randn(4 * k, k, generator=gen).to(device)
        sigma = x.t() @ x
        for name, kw in kinds.values():
            try:
                quantize_weight(w, sigma, **kw)
            except Exception as e:
                print(f"warm-up {name} failed: {type(e).__name__}: {e}", flush=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    print(f"warm-up {time.time() - t0:.1f} s", flush=True)


def newest(rows, name, code=None):
    """The newest row of config `name` run with `code` (None: any code), or None."""
    found = [r for r in rows if r["name"] == name and (code is None or r.get("code") == code)]
    return max(found, key=lambda r: r.get("date", "")) if found else None


def codes_in_order(rows):
    first = {}
    for r in sorted(rows, key=lambda r: r.get("date", "")):
        first.setdefault(r.get("code", "?"), len(first))
    return sorted(first, key=first.get)


def fp16_of(rows, code):
    """fp16 perplexity for rows of `code`: its own fp16 row, else the newest of any code (the fp16 model does
    not depend on the quantization code)."""
    r = newest(rows, "fp16", code) or newest(rows, "fp16")
    return None if r is None else r["ppl"]


def targets(rows):
    """The two targets of issue 4, per code version, each against the gptq-3 row of the same code."""
    lines = []
    for code in codes_in_order(rows):
        fp, g = fp16_of(rows, code), newest(rows, "gptq-3", code)
        for sfx in ("", "-q"):
            q, q1 = newest(rows, f"quantease-3{sfx}", code), newest(rows, f"quantease-3+1%{sfx}", code)
            if (q or q1) and (fp is None or g is None):
                lines.append(f"- code {code}: quantease-3{sfx} rows but no {'fp16' if fp is None else 'gptq-3'} "
                             f"row of this code: no target computed")
                continue
            if q:
                ge, qe = g["ppl"] - fp, q["ppl"] - fp
                met = "met" if qe <= 0.9 * ge else "NOT met"
                lines.append(f"- code {code}: quantease-3{sfx} excess ppl {qe:.3f} vs gptq-3 {ge:.3f}: "
                             f"{100 * (1 - qe / ge):.1f}% smaller (target >= 10%: {met})")
            if q1:
                closed = 1 - (q1["ppl"] - fp) / (g["ppl"] - fp)
                lines.append(f"- code {code}: quantease-3+1%{sfx} closes {100 * closed:.1f}% of gptq-3's gap to fp16 "
                             f"(target >= 60%: {'met' if closed >= 0.6 else 'NOT met'})")
    return lines


def same_protocol(r, args):
    return (r.get("nsamples"), r.get("seqlen"), r.get("eval_limit")) == (args.nsamples, args.seqlen, args.eval_limit)


def has_row(rows, name, args):
    """A row of this config for the code this process runs, same protocol: the config is done."""
    return any(r["name"] == name and r.get("code") == code_hash() and same_protocol(r, args) for r in rows)


def code_legend(rows):
    """One line per code hash: its label (given with the run, else a recent commit whose files it matches)."""
    commits = commit_labels()
    lines = []
    for code in codes_in_order(rows):
        mine = [r for r in rows if r.get("code") == code]
        label = next((r["code_label"] for r in mine if r.get("code_label")), None)
        known = commits.get(code)
        what = "; ".join(x for x in (label, known and f"= the files of {known}") if x) or "no label"
        dates = sorted(r["date"] for r in mine if "date" in r)
        trees = sorted({r["tree"] for r in mine if "tree" in r})
        lines.append(f"- `{code}`: {what} ({len(mine)} rows, {dates[0]} to {dates[-1]}"
                     + (f"; whole quantease tree {', '.join(trees)}" if trees else "") + ")")
    return lines


def write_md(rows, args, path):
    """The markdown table of the rows of this protocol (all code versions), then targets; an existing file's
    text from the HISTORY line on is kept."""
    rows = [r for r in rows if same_protocol(r, args)]
    first = rows[0] if rows else {}
    machines = sorted({r["machine"] for r in rows if r.get("machine")}) or [machine(args.device)]
    where = " / ".join(machines)
    if args.device == "cpu" and "shared" not in where and "CPU" in where:
        where += ", shared with other jobs"
    dates = sorted({r["date"] for r in rows if "date" in r})
    when = f"{dates[0]} to {dates[-1]}" if len(dates) > 1 else (dates[0] if dates else
                                                                time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    lines = [
        f"## Whole-model quality (issue 4): SmolLM2-135M-Instruct, WikiText-2 perplexity{args.title}",
        "",
        f"Command: `{args.command or command_line()}`  ",
        f"Machine: {where}; date {when}  ",
        f"Calibration: {args.nsamples} random windows x {args.seqlen} tokens of c4_sample.jsonl (seed 0); "
        f"all linears of a block from one pass (not true-sequential).  ",
        "Eval: WikiText-2 raw test rows joined with \"\\n\\n\", non-overlapping 2048-token windows, "
        + ("all windows" if args.eval_limit is None else f"first {args.eval_limit} windows only")
        + (f" ({first['windows']})" if "windows" in first else "")
        + "; quantized checkpoints are dequantized to dense weights for the forward.  ",
        "Per-channel (g=-1) asymmetric grids unless g128; outliers: fraction of weights kept in fp16 (ELL slots); "
        "target q: each layer minimises ||W X_q - Ŵ X_q|| on the quantized model's inputs, fp: ||W X_fp - Ŵ X_q|| "
        "(quantease's default from 2026-11-24 11:20; the -q configs force q, gptq-3-fpt forces fp).  ",
        "time = whole `quantize_model` run (model load, calibration forwards, quantization, checkpoint write); "
        "quant s = sum over layers of quantize_weight time; wall s = the config's whole turn (quantize_model, "
        "loading and evaluating the checkpoint)"
        + ("; all configs of a run in one process" + (" after an untimed warm-up of every method (Triton compile)"
                                                       if args.device.startswith("cuda") else "") + "."
           if args.in_process else "."),
        "code = sha256 of quantease/quantize, quantease/format and quantease/eval.py (the files that decide the "
        "numbers) when the row ran; excess over fp16 is against the fp16 row.",
        "",
        "| config | bits/weight | ppl | excess over fp16 | mean layer rel err | time (s) | quant s | wall s | target "
        "| code | date |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {n: i for i, n in enumerate(CONFIGS)}
    corder = {c: i for i, c in enumerate(codes_in_order(rows))}
    for r in sorted(rows, key=lambda r: (order.get(r["name"], len(order)), corder.get(r.get("code"), 0))):
        fp = fp16_of(rows, r.get("code"))
        excess = f"{r['ppl'] - fp:+.3f}" if fp is not None and r["name"] != "fp16" else ""
        rel = f"{r['mean_rel_error']:.4f}" if "mean_rel_error" in r else ""
        digits = 1 if r["seconds"] < 100 else 0
        target = r.get("target", "q") if r["name"] != "fp16" else ""
        lines.append(f"| {r['name']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | {excess} | {rel} | "
                     f"{r['seconds']:.{digits}f} | {r['quant_seconds']:.{digits}f} | {r.get('wall_seconds', 0):.0f} | "
                     f"{target} | "
                     f"{r.get('code', '?')} | {r.get('date', '')[5:]} |")
    lines += ["", "Code:"] + (code_legend(rows) or ["- (no rows yet)"])
    lines += ["", "Targets (each code's quantease rows against its own gptq-3 row):"]
    lines += targets(rows) or ["- (not enough configs finished yet)"]
    if args.render:
        missing = [n for n in args.configs if not any(r["name"] == n for r in rows)]
        if missing:
            lines += ["", f"Not run yet (no row of any code): {', '.join(missing)}."]
    else:
        missing = [n for n in args.configs if not has_row(rows, n, args)]
        if missing:
            lines += ["", f"Not finished in this session (code {code_hash()}): {', '.join(missing)}."]
    if args.note:
        lines += ["", args.note]
    text = "\n".join(lines) + "\n"
    old = path.read_text() if path.exists() else ""
    if HISTORY in old:
        text += "\n" + old[old.index(HISTORY):]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def merge(rows, files):
    """rows plus the rows of the JSON files that are not already there (the same measurement: config, protocol,
    date and ppl; not the code, which a relabelled copy may have changed)."""
    def key(r):
        return r["name"], r.get("nsamples"), r.get("seqlen"), r.get("eval_limit"), r.get("date"), round(r["ppl"], 6)
    seen = {key(r) for r in rows}
    added = 0
    for f in files:
        for r in json.loads(Path(f).read_text()):
            if key(r) not in seen:
                seen.add(key(r))
                rows.append(r)
                added += 1
    print(f"merged {added} new rows from {len(files)} file(s); {len(rows)} rows")
    return rows


def command_line():
    return "python3 benchmarks/quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--render")


def estimate(rows, name, slowest):
    """Expected wall seconds of config `name` on this machine: the slowest earlier row (any code) of the same
    config, else of the same method (target fp: x1.3, its second activation stream), else the slowest config
    of this session (0 before the first)."""
    def wall(pred):
        return max((r["wall_seconds"] for r in rows if pred(r) and "wall_seconds" in r
                    and r.get("machine") == machine_now()), default=None)
    o = CONFIGS[name] or {}
    same = wall(lambda r: r["name"] == name)
    if same is not None:
        return same
    def kind(r, same_target):
        c = CONFIGS.get(r["name"]) or {}
        return c.get("method") == o.get("method") and (not same_target or c.get("target") == o.get("target"))
    kin = wall(lambda r: kind(r, True))
    if kin is not None:
        return kin
    kin = wall(lambda r: kind(r, False))
    if kin is not None:
        return kin * (1.3 if o.get("target") == "fp" else 1.0)
    return slowest


def run_all(rows, args, work, jpath):
    """--in-process: every config in this process, one after the other."""
    if args.device.startswith("cuda"):
        warm_up(args.device, [n for n in args.configs if not has_row(rows, n, args)])
    slowest = 0.0
    for name in args.configs:
        if has_row(rows, name, args):
            continue
        need = 1.15 * estimate(rows, name, slowest)
        if args.deadline and time.time() + need > args.deadline:
            print(f"=== {name}: skipped, {args.deadline - time.time():.0f} s left < {need:.0f} s expected "
                  f"(1.15 x its estimate from earlier rows)", flush=True)
            continue
        print(f"=== {name} ({time.strftime('%H:%M:%S')})", flush=True)
        try:
            row = run_config(name, CONFIGS[name], args, work)
        except Exception as e:  # one broken config must not cost the others
            print(f"=== {name} failed: {type(e).__name__}: {e}", flush=True)
            continue
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        slowest = max(slowest, row["wall_seconds"])
        print(f"ROW {json.dumps(row)}", flush=True)
        rows.append(row)
        jpath.write_text(json.dumps(rows, indent=1))
        write_md(rows, args, Path(args.out))


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
    p.add_argument("--in-process", action="store_true", help="all configs in this process (GPU machine)")
    p.add_argument("--deadline", type=float, default=None,
                   help="unix time: start no config that the slowest one so far would not finish by then")
    p.add_argument("--render", action="store_true", help="only rewrite the markdown from the results file")
    p.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                   help="first add the rows of these results files (a device run's results.json) to --json")
    p.add_argument("--note", default="", help="a status paragraph appended to the markdown")
    p.add_argument("--title", default="", help="appended to the markdown heading (e.g. ' (H100, full protocol)')")
    p.add_argument("--command", default="", help="the command line shown in the markdown (default: this one)")
    p.add_argument("--code-label", default=os.environ.get("CODE_LABEL", ""),
                   help="what the code of this run is, kept in each row (e.g. 'working tree 11:40, new CD')")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config, print its row
    args = p.parse_args()
    code_hash(), tree_hash()
    MACHINE_DEVICE[0] = args.device
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    jpath = Path(args.json or work / "results.json")
    rows = json.loads(jpath.read_text()) if jpath.exists() else []
    if args.merge:
        rows = merge(rows, args.merge)
        jpath.write_text(json.dumps(rows, indent=1))
    if args.render:
        write_md(rows, args, Path(args.out))
        return
    if args.one:
        print("ROW " + json.dumps(run_config(args.one, CONFIGS[args.one], args, work)), flush=True)
        return
    if args.in_process:
        run_all(rows, args, work, jpath)
        write_md(rows, args, Path(args.out))
        return
    for name in args.configs:
        if has_row(rows, name, args):
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
