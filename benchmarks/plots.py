"""Figures of the benchmark results (matplotlib; the `bench` extra): PNGs into benchmarks/plots/.

    .venv/bin/python benchmarks/plots.py

  e2e_throughput.png    vLLM decode tok/s vs batch per model, and speedup over fp16 (results/throughput.csv)
  speedup_vs_batch.png  speedup over fp16 vs tokens per step: the whole vLLM model (results/throughput.csv) next to
                        the fused kernel alone at 0.5% outliers (results/kernels.csv, else the kernels.md table)
  ppl_vs_bits.png       WikiText-2 perplexity vs storage bits/weight (quality benchmark: the first table of
                        results/quality.md, else a local run's .dev/quality/results*.json)
  quant_time.png        seconds per 8B-shape block per method (results/quant_time.csv)
A missing input skips its figure with one line saying which file it needs.
"""
import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "benchmarks/results"
ORDER = ("fp16", "quantease", "gptq")
NAMES = {"fp16": "fp16", "quantease": "quantease 3-bit + 0.5% outliers", "gptq": "GPTQ-Marlin 4-bit g128"}
TARGETS = {1: 3.0, 32: 1.8}  # decode speedup targets over fp16 (issue 7), by batch


def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def log2_axis(ax):
    """log-2 x axis labelled with plain batch sizes (1, 8, 32, ...), not powers."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def decode_rows(path):
    """{model: {batch: decode tok/s}} of the throughput CSV (decode rows only)."""
    out = {}
    for r in read_csv(path):
        if int(r["new_tokens"]) > 0 and r["decode_tok_s"]:
            out.setdefault(r["model"], {})[int(r["batch"])] = float(r["decode_tok_s"])
    return out


def e2e_speedups(dec):
    base = dec.get("fp16", {})
    return {m: {b: v / base[b] for b, v in sorted(d.items()) if b in base} for m, d in dec.items() if m != "fp16"}


def plot_e2e(tp_csv, png, note):
    dec = decode_rows(tp_csv)
    p = plt()
    fig, (a, b) = p.subplots(1, 2, figsize=(11, 4.2))
    for m in [m for m in ORDER if m in dec]:
        xs = sorted(dec[m])
        a.plot(xs, [dec[m][x] for x in xs], marker="o", label=NAMES.get(m, m))
    log2_axis(a)
    a.set_yscale("log")
    a.set_xlabel("batch (concurrent sequences)")
    a.set_ylabel("decode tokens/s (all sequences)")
    a.set_title("vLLM decode throughput")
    a.legend(fontsize=8)
    a.grid(alpha=0.3, which="both")
    for m, sp in e2e_speedups(dec).items():
        xs = sorted(sp)
        b.plot(xs, [sp[x] for x in xs], marker="o", label=NAMES.get(m, m))
        for x in xs:
            b.annotate(f"{sp[x]:.2f}x", (x, sp[x]), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    b.scatter(list(TARGETS), list(TARGETS.values()), marker="_", s=400, color="red", label="target")
    b.axhline(1.0, color="gray", lw=0.8)
    log2_axis(b)
    b.set_xlabel("batch (concurrent sequences)")
    b.set_ylabel("decode speedup over fp16")
    b.set_title("speedup over fp16 (same run)")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    p.close(fig)
    return png


def kernel_speedups(path, fraction=0.005):
    """{(N, K): {M: speedup over fp16 F.linear}} of kernels.csv's bench rows at one outlier fraction."""
    out = {}
    with open(path, newline="") as f:
        for r in csv.reader(f):
            if r and r[0] == "bench" and abs(float(r[4]) - fraction) < 1e-9:
                out.setdefault((int(r[1]), int(r[2])), {})[int(r[3])] = float(r[8])
    return out


def kernel_speedups_md(path):
    """The same from the kernels engineer's table in results/kernels.md ("| NxK | M | ... | a / b / c | ...",
    speedups at 0% / 0.5% / 1% outliers): the 0.5% column."""
    out = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(r"\|\s*(\d+)x(\d+)\s*\|\s*(\d+)\s*\|.*\|\s*([\d.]+) / ([\d.]+) / ([\d.]+)\s*\|", line)
        if m:
            out.setdefault((int(m.group(1)), int(m.group(2))), {})[int(m.group(3))] = float(m.group(5))
    return out


def kernel_source(res):
    """(path, {(N, K): {M: speedup}}) from kernels.csv, else kernels.md; (None, {}) if neither."""
    if (res / "kernels.csv").exists():
        return res / "kernels.csv", kernel_speedups(res / "kernels.csv")
    if (res / "kernels.md").exists():
        sp = kernel_speedups_md(res / "kernels.md")
        if sp:
            return res / "kernels.md", sp
    return None, {}


def plot_speedup_vs_batch(kern, tp_csv, png, note):
    p = plt()
    fig, ax = p.subplots(figsize=(7.5, 4.5))
    if kern:
        for (n, k), sp in sorted(kern.items()):
            xs = sorted(sp)
            ax.plot(xs, [sp[x] for x in xs], marker=".", lw=1, alpha=0.7, label=f"kernel {n}x{k}")
    if tp_csv is not None:
        for m, sp in e2e_speedups(decode_rows(tp_csv)).items():
            xs = sorted(sp)
            ax.plot(xs, [sp[x] for x in xs], marker="o", lw=2.5, color="black" if m == "quantease" else None,
                    label=f"vLLM end-to-end, {NAMES.get(m, m)}")
    ax.axhline(1.0, color="gray", lw=0.8)
    log2_axis(ax)
    ax.set_xlabel("tokens per step (kernel M = decode batch)")
    ax.set_ylabel("speedup over fp16")
    ax.set_title("3-bit + 0.5% outliers: speedup over fp16 vs batch")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle(note, fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    p.close(fig)
    return png


def quality_rows(res=RES):
    """[(config, bits/weight, ppl, code)] of the quality benchmark's headline table: the first table of
    results/quality.md (older tables below it are history; columns found by their header, code "" when the
    table has none), else the JSON files of a local run (.dev/quality/results*.json, merged by config and
    code); (rows, source)."""
    md = res / "quality.md"
    rows, cols = [], None
    if md.exists():
        for line in md.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
            if cells and cols is None and "config" in cells and "ppl" in cells:
                cols = {c: i for i, c in enumerate(cells)}
            elif cells and cols and not set(line) <= set("|- "):
                code = cells[cols["code"]] if "code" in cols and cols["code"] < len(cells) else ""
                rows.append((cells[cols["config"]], float(cells[cols["bits/weight"]]), float(cells[cols["ppl"]]), code))
            elif rows and not cells:
                break  # end of the first table
        if rows:
            return rows, md
    files = sorted((ROOT / ".dev/quality").glob("results*.json"))
    if not files:
        return [], None
    merged = {}
    for js in files:
        for r in json.loads(js.read_text()):
            merged.setdefault((r["name"], r.get("code", "")),
                              (r["name"], float(r["bits_per_weight"]), float(r["ppl"]), r.get("code", "")))
    return list(merged.values()), files[0].parent / "results*.json"


def label_places(rows, gap=1.09):
    """[(row, label y)]: points of about the same bits/weight get their labels at least `gap` apart (a
    ratio: the axis is log), in the order of their ppl, centred on the points."""
    out = []
    for col in sorted({round(r[1], 1) for r in rows}):
        pts = sorted((r for r in rows if round(r[1], 1) == col), key=lambda r: r[2])
        ys = [pts[0][2]]
        for r in pts[1:]:
            ys.append(max(r[2], ys[-1] * gap))
        shift = (math.prod(r[2] for r in pts) / math.prod(ys)) ** (1 / len(ys))  # geometric centring
        out += [(r, y * shift) for r, y in zip(pts, ys)]
    return out


def plot_quality(rows, png, source):
    """ppl vs bits/weight, the newest row of each config; rows of an older code version than the newest are
    hollow and labelled with their code hash (the table keeps them all)."""
    p = plt()
    fig, ax = p.subplots(figsize=(7.5, 4.8))
    codes = list(dict.fromkeys(code for _, _, _, code in rows))  # table order: oldest code first
    newest = codes[-1] if codes else ""
    latest = {}
    for row in rows:  # newest code wins, else the later row
        name, code = row[0], row[3]
        if name not in latest or codes.index(code) >= codes.index(latest[name][3]):
            latest[name] = row
    fp16 = latest.pop("fp16", (None, None, None, None))[2]
    colors = {"rtn": "tab:gray", "gptq": "tab:orange", "quantease": "tab:blue"}
    for name, bits, ppl, code in latest.values():
        c = colors.get(name.split("-")[0], "tab:green")
        old = len(codes) > 1 and code != newest
        ax.scatter(bits, ppl, s=30, color="none" if old else c, edgecolors=c)
    for (name, bits, ppl, code), y in label_places(list(latest.values())):
        old = len(codes) > 1 and code != newest
        ax.annotate(f"{name} ({code[:7]})" if old else name, (bits, ppl), xytext=(bits + 0.04, y), fontsize=7,
                    va="center", color="gray" if old else "black",
                    arrowprops=dict(arrowstyle="-", lw=0.4, color="gray"))
    for method, c in colors.items():
        ax.scatter([], [], color=c, label=method)
    if len(codes) > 1:
        ax.scatter([], [], color="none", edgecolors="black", label=f"older code (newest: {newest[:7]})")
    if fp16 is not None:
        ax.axhline(fp16, color="black", lw=0.8, ls="--", label=f"fp16 ({fp16:.2f})")
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else ""))
    ax.set_xlabel("storage bits / weight (codes + scales + zeros + outlier slots)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title("SmolLM2-135M-Instruct: perplexity vs bits/weight")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    n = len({name for name, _, _, _ in rows})
    ax.set_xlim(min(r[1] for r in latest.values()) - 0.1, max(r[1] for r in latest.values()) + 0.35)
    fig.suptitle(f"from {source.relative_to(ROOT)}: {n} configs, {len(rows)} rows"
                 + (f", code {', '.join(c[:7] for c in codes if c)}" if any(codes) else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    p.close(fig)
    return png


def plot_quant_time(qt_csv, png, note):
    rows = [r for r in read_csv(qt_csv) if r.get("per_block_s")]
    p = plt()
    fig, ax = p.subplots(figsize=(6.5, 4))
    names = [r["method"] for r in rows]
    qw = [float(r["quantize_weight_s"]) for r in rows]
    rest = [float(r["per_block_s"]) - q for r, q in zip(rows, qw)]
    ax.bar(names, qw, label="quantize_weight (7 linears)")
    ax.bar(names, rest, bottom=qw, label="Σ and calibration forwards, block outputs, waits on the resume save")
    for i, r in enumerate(rows):
        meas, ext = r.get("measured_32_s"), r.get("extrapolated_32_s")
        total = (f"\n32 blocks {float(meas) / 60:.1f} min (measured)" if meas else
                 f"\n32 blocks ~{float(ext) / 60:.1f} min (extrapolated)" if ext else "")
        label = f"{float(r['per_block_s']):.1f} s/block" + total
        ax.annotate(label, (i, float(r["per_block_s"])), textcoords="offset points", xytext=(0, 4), ha="center",
                    fontsize=8)
    ax.set_ylabel("seconds per Llama-3-8B-shape block")
    ax.set_title(f"quantization time per block ({rows[0].get('calib', '?')} calibration tokens)")
    ax.set_ylim(0, max(float(r["per_block_s"]) for r in rows) * 1.35)
    ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(note, fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    p.close(fig)
    return png


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(RES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/plots"))
    ap.add_argument("--note", default="", help="subtitle: machine, date")
    args = ap.parse_args()
    res, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tp = res / "throughput.csv"
    qt = res / "quant_time.csv"
    made = []
    if tp.exists():
        made.append(plot_e2e(tp, out / "e2e_throughput.png", args.note))
    else:
        print(f"skip e2e_throughput.png: needs {tp} (benchmarks/throughput.py on the GPU)")
    ksrc, kern = kernel_source(res)
    if tp.exists():
        if not kern:
            print(f"speedup_vs_batch.png: no kernels.csv / kernels.md table in {res}: end-to-end only")
        note = args.note + (f"; kernels from {ksrc.name}" if kern else "")
        made.append(plot_speedup_vs_batch(kern, tp, out / "speedup_vs_batch.png", note))
    else:
        print(f"skip speedup_vs_batch.png: needs {tp} (the kernel-only plot is kernels.py's kernels_speedup.png)")
    rows, source = quality_rows(res)
    if any(name != "fp16" for name, _, _, _ in rows):
        made.append(plot_quality(rows, out / "ppl_vs_bits.png", source))
    else:
        print(f"skip ppl_vs_bits.png: needs quantized rows in the table of {res / 'quality.md'} or in "
              ".dev/quality/results*.json (benchmarks/quality.py writes both)")
    if qt.exists():
        made.append(plot_quant_time(qt, out / "quant_time.png", args.note))
    else:
        print(f"skip quant_time.png: needs {qt} (benchmarks/quant_time.py on the GPU)")
    for png in made:
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
