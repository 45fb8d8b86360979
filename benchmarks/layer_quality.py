"""Layer-wise quality and speed of the quantizers: relative error f(Q) / tr(W Sigma W^T).

    python benchmarks/layer_quality.py                    # synthetic + SmolLM2-135M layers (CPU)
    python benchmarks/layer_quality.py --study            # init / act-order / sweeps study (CPU)
    python benchmarks/layer_quality.py --gpu-timing       # seconds per layer on CUDA, 4096x4096, 11008x4096

Prints markdown tables (and writes them to --out when given).
"""
import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantease.format import layout  # noqa: E402
from quantease.quantize import quantize_weight  # noqa: E402

MODEL = ROOT / ".cache/smollm2-135m-instruct"
C4 = Path(os.environ.get("QUANTEASE_SHARED", ROOT.parent / "shared")) / "data/c4/c4_sample.jsonl"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

METHODS = {  # column name -> quantize_weight options
    "rtn": dict(method="rtn"),
    "gptq": dict(method="gptq"),
    "qe fixed grid": dict(method="quantease", refit=False, rounds=1),  # the defaults before grid refit
    "quantease": dict(method="quantease"),
    "qe+0.5%": dict(method="quantease", outlier_fraction=0.005),
    "qe+1%": dict(method="quantease", outlier_fraction=0.01),
}


def correlated_sigma(k, tokens=4096, seed=0, device="cpu"):
    """Sigma of LLM-like inputs: a few strong shared directions, uneven channel scales, outlier channels."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    low = torch.randn(tokens, 16, generator=g) @ torch.randn(16, k, generator=g)
    x = torch.randn(tokens, k, generator=g) + 0.5 * low
    x *= torch.exp(0.5 * torch.randn(k, generator=g))
    x[:, torch.randperm(k, generator=g)[: max(1, k // 200)]] *= 20
    x = x.to(device)
    return x.T @ x


def synthetic_layers(device="cpu"):
    g = torch.Generator().manual_seed(1)
    out = {}
    for n, k in ((512, 1024), (1024, 512)):
        w = torch.randn(n, k, generator=g) * 0.02
        w[torch.rand(n, k, generator=g) < 0.002] *= 10  # heavy tail
        out[f"synthetic {n}x{k}"] = (w.to(device), correlated_sigma(k, device=device))
    return out


def calibration(tokenizer, nsamples, seqlen, seed=0):
    texts = [json.loads(line)["text"] for line in open(C4)]
    random.seed(seed)
    batch = []
    while len(batch) < nsamples:
        ids = tokenizer(random.choice(texts), return_tensors="pt").input_ids[0]
        if len(ids) > seqlen:
            i = random.randint(0, len(ids) - seqlen - 1)
            batch.append(ids[i:i + seqlen])
    return torch.stack(batch)


def smollm_layers(blocks, nsamples, seqlen, cache=None):
    """{name: (W, Sigma)} for the linears of `blocks`, Sigma = sum x^T x over the calibration tokens."""
    if cache and Path(cache).exists():
        return torch.load(cache)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float16)
    model = model.float().eval()  # fp16 weights, float32 compute: fp16 matmuls are slow on CPU
    sigmas, hooks = {}, []

    def hook(name):
        def fn(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sigmas[name] = sigmas.get(name, 0) + x.T @ x
        return fn

    class Stop(Exception):
        pass

    def stop(mod, args, out):
        raise Stop

    for b in blocks:
        for lin in LINEARS:
            name = f"layers.{b}.{lin}"
            hooks.append(model.model.get_submodule(name).register_forward_pre_hook(hook(name)))
    hooks.append(model.model.layers[max(blocks)].register_forward_hook(stop))
    data = calibration(tok, nsamples, seqlen)
    with torch.no_grad():
        for i in range(0, nsamples, 4):
            try:
                model(data[i:i + 4])
            except Stop:
                pass
    for h in hooks:
        h.remove()
    out = {n: (model.model.get_submodule(n).weight.detach().float().clone(), s) for n, s in sigmas.items()}
    if cache:
        torch.save(out, cache)
    return out


def table(layers, bits_list, methods):
    rows = [f"| layer | bits | {' | '.join(methods)} | qe/gptq | qe/fixed | qe+0.5%/qe | qe+1%/qe | seconds qe, gptq |",
            "|---|---|" + "---|" * (len(methods) + 5)]
    for bits in bits_list:
        for name, (w, s) in layers.items():
            rel, sec = {}, {}
            for col, opts in methods.items():
                q = quantize_weight(w, s, bits=bits, **opts)
                rel[col], sec[col] = q.info["rel_error"], q.info["seconds"]
            ratio = lambda a, b: f"{rel[a] / rel[b]:.3f}" if a in rel and b in rel else "-"
            rows.append(f"| {name} | {bits} | " + " | ".join(f"{rel[c]:.5f}" for c in methods)
                        + f" | {ratio('quantease', 'gptq')} | {ratio('quantease', 'qe fixed grid')}"
                        + f" | {ratio('qe+0.5%', 'quantease')} | {ratio('qe+1%', 'quantease')}"
                        + f" | {sec.get('quantease', 0):.2f}, {sec.get('gptq', 0):.2f} |")
            print(rows[-1], flush=True)
    return rows


def study(layers, bits, max_sweeps=20):
    """Which init / act-order / number of sweeps for QuantEase: mean relative error over the layers
    and the ratio to GPTQ.  One run per init/act-order; sweep counts are read from info["rel_errors"]."""
    checkpoints = (1, 3, 5, 10, 20)
    rel = {"gptq": []}
    for name, (w, s) in layers.items():
        rel["gptq"].append(quantize_weight(w, s, bits=bits, method="gptq").info["rel_error"])
        for init in ("w", "rtn", "gptq"):
            for ao in (False, True):
                # one round: info["rel_errors"] is then one entry per sweep
                q = quantize_weight(w, s, bits=bits, method="quantease", init=init, act_order=ao, sweeps=max_sweeps,
                                    rounds=1)
                errs = q.info["rel_errors"]
                for c in checkpoints:
                    # early stop (no code changed) means later sweeps would give the same error
                    rel.setdefault(f"qe init={init} act_order={ao} sweeps={c}", []).append(errs[min(c, len(errs)) - 1])
        print(name, flush=True)
    rows = [f"| variant ({bits}-bit) | mean rel error | mean ratio to gptq | worst ratio to gptq |", "|---|---|---|---|"]
    for v in rel:
        ratios = [a / b for a, b in zip(rel[v], rel["gptq"])]
        rows.append(f"| {v} | {statistics.mean(rel[v]):.5f} | {statistics.mean(ratios):.3f} | {max(ratios):.3f} |")
        print(rows[-1], flush=True)
    return rows


def gpu_timing(reps=3, only=None):
    """Seconds per quantize_weight call on CUDA (median of reps runs), and the ratio to GPTQ with the
    same group size (issue 7: quantease <= 3x gptq).  only: run just the variants whose name contains one
    of these strings (the gptq baselines always run: the ratios need them)."""
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = ["| q x p | method | seconds (median of 3) | of which init | rel error | x gptq time |",
            "|---|---|---|---|---|---|"]
    w0, s0 = torch.randn(256, 512, device=dev), correlated_sigma(512, device=dev)
    for opts in METHODS.values():  # warm-up: Triton compile, cuBLAS handles
        quantize_weight(w0, s0, bits=3, sweeps=None if opts["method"] != "quantease" else 2, **opts)
    variants = {
        "gptq": dict(method="gptq"),
        "gptq, no clip": dict(method="gptq", clip=False),
        "quantease defaults (10 sweeps, refit, 2 rounds)": dict(method="quantease"),
        "quantease 10 sweeps, refit, 1 round": dict(method="quantease", rounds=1),
        "quantease 5 sweeps, refit, 2 rounds": dict(method="quantease", sweeps=5),
        "quantease 10 sweeps, fixed grid, 1 round (old default)": dict(method="quantease", refit=False, rounds=1),
        "quantease 5 sweeps, fixed grid, 1 round": dict(method="quantease", sweeps=5, refit=False, rounds=1),
        "quantease 5 sweeps, init=w, fixed grid": dict(method="quantease", sweeps=5, init="w", refit=False, rounds=1),
        "quantease 5 sweeps, torch sweep (no Triton), fixed grid": dict(method="quantease", sweeps=5, refit=False,
                                                                        rounds=1, no_triton=True),
        "quantease+0.5% defaults (10 sweeps, refit, 2 rounds)": dict(method="quantease", outlier_fraction=0.005),
        "quantease+0.5% 5 sweeps, fixed grid, 1 round (old)": dict(method="quantease", sweeps=5,
                                                                  outlier_fraction=0.005, refit=False, rounds=1),
        "gptq g128": dict(method="gptq", group_size=128),
        "quantease defaults g128": dict(method="quantease", group_size=128),
        "quantease g128, fixed grid, 1 round (old)": dict(method="quantease", group_size=128, refit=False, rounds=1),
    }
    if only:
        variants = {name: o for name, o in variants.items()
                    if name.startswith("gptq") and "clip" not in name or any(x in name for x in only)}
    for n, k in ((4096, 4096), (11008, 4096)):
        g = torch.Generator(device=dev).manual_seed(0)
        w = torch.randn(n, k, device=dev, generator=g) * 0.02
        s = correlated_sigma(k, tokens=8192, device=dev)
        quantize_weight(w, s, bits=3, method="gptq")  # warm-up at this size (allocator, cuBLAS plans)
        t_gptq = {}
        for name, opts in variants.items():
            opts = dict(opts)
            no_triton = opts.pop("no_triton", False)
            times = []
            for _ in range(1 if no_triton else reps):  # median of `reps` runs (single runs varied +-20%)
                if no_triton:
                    os.environ["QUANTEASE_NO_TRITON"] = "1"
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                q = quantize_weight(w, s, bits=3, **opts)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                os.environ.pop("QUANTEASE_NO_TRITON", None)
            dt = statistics.median(times)
            init_s = q.info.get("init_seconds")
            init_s = "-" if init_s is None else f"{init_s:.3f}"
            gs = opts.get("group_size", -1)
            if opts["method"] == "gptq" and opts.get("clip", True):
                t_gptq[gs] = dt
            rows.append(f"| {n}x{k} | {name} | {dt:.3f} | {init_s} | {q.info['rel_error']:.5f} "
                        f"| {dt / t_gptq[gs]:.2f} |")
            print(rows[-1], flush=True)
    return rows


def row_errors(w, s, **opts):
    """f per output row, tr((W - Q) Sigma (W - Q)^T) split by rows (rows are independent in f)."""
    e = w - quantize_weight(w, s, bits=3, **opts).dequantize().to(w.device, torch.float32)
    return ((e @ s) * e).sum(1)


def best_allocation(f, budget):
    """f [N, R+1]: row i's error with r outlier slots.  -> (counts [N], total error) minimising the sum under
    sum(counts) <= budget: a Lagrangian split (each row argmin f_i(r) + lam r, lam by bisection), its leftover
    slots then given one at a time to the row that gains most.  Any such split is feasible; it is optimal
    on the rows' convex hulls."""
    r = torch.arange(f.shape[1], dtype=f.dtype)
    lo, hi = 0.0, float((f[:, 0] - f[:, -1]).max()) + 1.0
    for _ in range(60):
        lam = (lo + hi) / 2
        if int((f + lam * r).argmin(1).sum()) > budget:
            lo = lam
        else:
            hi = lam
    counts = (f + hi * r).argmin(1)
    rows = torch.arange(f.shape[0])
    while int(counts.sum()) < budget:
        nxt = (counts + 1).clamp(max=f.shape[1] - 1)
        gain = f[rows, counts] - f[rows, nxt]
        i = int(gain.argmax())
        if gain[i] <= 0:
            break
        counts[i] += 1
    return counts, float(f[rows, counts].sum())


def allocation(layers, fraction=0.005, cap=None):
    """Issue 2's outlier budget s = fraction * N * K, row-balanced (floor(fraction K) slots in every row, what
    the ELL format stores) against the best per-row counts with the same total, measured: every row's error
    for r = 0 .. cap (default 2 R + 2) slots from one quantize_weight run per r (rows are independent in f and in
    every step of the algorithm, so row i of the run with r slots is what row i gets with r slots)."""
    rows = ["| layer | N x K | s (budget) | plain CD | row-balanced R | ratio | best per-row split: max count | ratio |",
            "|---|---|---|---|---|---|---|---|"]
    for name, (w, s) in layers.items():
        n, k = w.shape
        r0, budget = layout.outlier_slots(k, fraction), int(fraction * n * k)
        f = torch.stack([row_errors(w, s, method="quantease", outlier_fraction=(r + 0.5) / k if r else 0.0)
                         for r in range((cap or 2 * r0 + 2) + 1)], 1).double()
        base = float((w @ s * w).sum())
        counts, best = best_allocation(f, budget)
        plain, bal = float(f[:, 0].sum()), float(f[:, r0].sum())
        rows.append(f"| {name} | {n}x{k} | {budget} | {plain / base:.5f} | R={r0}: {bal / base:.5f} "
                    f"| {bal / plain:.3f} | {int(counts.max())}: {best / base:.5f} | {best / plain:.3f} |")
        print(rows[-1], flush=True)
    return rows


def parity():
    """CPU vs CUDA on one layer: code agreement and relative errors."""
    rows = ["| method | codes equal | rel error cpu | rel error cuda |", "|---|---|---|---|"]
    w, s = synthetic_layers()["synthetic 512x1024"]
    for col, opts in METHODS.items():
        a = quantize_weight(w, s, bits=3, **opts)
        b = quantize_weight(w.cuda(), s.cuda(), bits=3, **opts)
        eq = (a.codes == b.codes.cpu()).float().mean().item()
        rows.append(f"| {col} | {eq:.4f} | {a.info['rel_error']:.5f} | {b.info['rel_error']:.5f} |")
        print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu-timing", action="store_true")
    ap.add_argument("--variants", nargs="+", help="--gpu-timing: only the variants whose name holds one of these")
    ap.add_argument("--study", action="store_true")
    ap.add_argument("--allocation", action="store_true", help="row-balanced vs best per-row outlier counts")
    ap.add_argument("--cap", type=int, help="--allocation: the most slots a row may get (default 2 R + 2)")
    ap.add_argument("--layers", nargs="+", help="only these layer names (SmolLM2: e.g. layers.2.self_attn.v_proj)")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--no-smollm", action="store_true")
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 10])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--cache", default="/tmp/smollm_sigmas.pt", help="Sigma cache file ('' = none)")
    ap.add_argument("--threads", type=int, default=1)  # 2+ threads crawl on a shared CPU
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = []
    if args.gpu_timing:
        lines += ["### GPU timing (3-bit, per layer)", ""] + gpu_timing(only=args.variants)
        lines += ["", "### CPU/CUDA parity (synthetic 512x1024, 3-bit)", ""] + parity()
    else:
        layers = {}
        if not args.no_synthetic:
            layers.update(synthetic_layers())
        if not args.no_smollm:
            layers.update(smollm_layers(args.blocks, args.nsamples, args.seqlen, args.cache or None))
        if args.layers:
            missing = [n for n in args.layers if n not in layers]
            if missing:
                sys.exit(f"--layers: no layer {', '.join(missing)}; the layers are {', '.join(layers)}")
            layers = {n: layers[n] for n in args.layers}
        if args.allocation:
            lines += allocation(layers, cap=args.cap)
        elif args.study:
            for bits in (3, 4):
                lines += study(layers, bits) + [""]
        else:
            lines += table(layers, (3, 4), METHODS)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
