"""A synthetic Llama-3-8B decode step on the GPU, with and without the cross-layer L2 prefetch (kernels/xprefetch.py).

    PYTHONPATH=$PWD python3 benchmarks/xprefetch.py --out $OUT [--ms 1,8,32] [--pdl 16] [--layers 8] [--ctx 512]
    PYTHONPATH=$PWD python3 benchmarks/xprefetch.py --smoke          # CPU, TRITON_INTERPRET: the code paths only

Per layer, as vLLM runs it: fused residual add + RMSNorm (one Triton kernel, like vLLM's), qkv 6144x4096, decode
attention over a --ctx-token KV cache (SDPA, GQA 32 / 8 heads), o 4096x4096, add + norm, gate_up 28672x4096,
SiLU-and-mul (one kernel), down 4096x14336; 3-bit + 0.5% outliers (random codes: speed does not depend on them);
--layers layers (8: ~660 MB of words, so every layer's words are cold in L2 when it starts) in one CUDA graph,
median over replays.  Variants (--caps): $QUANTEASE_XPREFETCH off / 4 / 8 / 16 / 32 MiB (bulk, issued by the grid's
last program per SM) / 16:all (by every program) / 16:lines (per line); with --pdl CAPS also $QUANTEASE_PDL=1 alone
and with each of CAPS; and fp16 (cuBLAS) for the ratio.  --between none drops the kernels between the linears (the
GEMVs back to back, a copy where shapes differ: what the prefetch costs when nothing idles DRAM).  Each variant's
final hidden state is compared with the prefetch-off run's (relative difference printed, MISMATCH above 1e-2).
"""
import argparse
import csv
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.kernels import make_prepared, replay_median  # noqa: E402
from quantease.kernels import ops, xprefetch  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 4096, 32, 8, 128, 14336
SMOKE = dict(HIDDEN=256, HEADS=4, KV_HEADS=2, HEAD_DIM=64, INTER=512)  # --smoke: the same chain, small


@triton.jit
def add_norm_kernel(h_ptr, y_ptr, out_ptr, w_ptr, D, eps, BLOCK: tl.constexpr):
    """h += y; out = rmsnorm(h) * w, one row per program (vLLM's fused_add_rms_norm)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    h = tl.load(h_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    h += tl.load(y_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + row * D + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
    r = tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs, (h * r * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def silu_mul_kernel(gu_ptr, out_ptr, D, BLOCK: tl.constexpr):
    """out = silu(gu[:, :D]) * gu[:, D:] (vLLM's silu_and_mul)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    g = tl.load(gu_ptr + row * 2 * D + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * D + D + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs, (g / (1 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=mask)


def add_norm(h, y, w):
    out = torch.empty_like(h)
    add_norm_kernel[(h.shape[0],)](h, y, out, w, h.shape[1], 1e-5, BLOCK=triton.next_power_of_2(h.shape[1]))
    return out


def silu_mul(gu):
    d = gu.shape[1] // 2
    out = torch.empty(gu.shape[0], d, dtype=gu.dtype, device=gu.device)
    silu_mul_kernel[(gu.shape[0], triton.cdiv(d, 1024))](gu, out, d, BLOCK=1024)
    return out


def make_layers(count, fraction, device, dims):
    """[{qkv, o, gate_up, down}: prepared dicts] with distinct random words per layer."""
    h, hd, inter = dims["HIDDEN"], dims["HEAD_DIM"], dims["INTER"]
    qkv = (dims["HEADS"] + 2 * dims["KV_HEADS"]) * hd
    shapes = dict(qkv=(qkv, h), o=(h, h), gate_up=(2 * inter, h), down=(h, inter))
    return [{name: make_prepared(n, k, 3, -1, fraction, device=device, seed=4 * i + j, asym=True)[0]
             for j, (name, (n, k)) in enumerate(shapes.items())} for i in range(count)]


def fp16_layers(layers):
    """The same shapes as fp16 weights (cuBLAS), for the ratio."""
    return [{name: torch.randn(p["out_features"], p["in_features"], dtype=torch.float16, device="cuda") * 0.02
             for name, p in layer.items()} for layer in layers]


class Step:
    """One decode step over all layers for M sequences; run() reads self.h0 and leaves the last hidden state."""

    def __init__(self, layers, m, ctx, dims, between, linear, device):
        self.layers, self.m, self.between, self.linear, self.dims = layers, m, between, linear, dims
        d = dims["HIDDEN"]
        g = torch.Generator(device=device).manual_seed(7)
        self.h0 = torch.randn(m, d, generator=g, device=device).half()
        self.norm_w = torch.ones(d, dtype=torch.float16, device=device)
        kv = (m, dims["KV_HEADS"], ctx, dims["HEAD_DIM"])
        self.k_cache = torch.randn(*kv, generator=g, device=device).half()
        self.v_cache = torch.randn(*kv, generator=g, device=device).half()
        self.h = self.h0.clone()

    def attention(self, qkv):
        d, hd = self.dims, self.dims["HEAD_DIM"]
        q = qkv[:, : d["HEADS"] * hd].reshape(self.m, d["HEADS"], 1, hd)
        a = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, enable_gqa=True)
        return a.reshape(self.m, d["HEADS"] * hd)

    def run(self):
        self.h.copy_(self.h0)
        zero = torch.zeros_like(self.h)
        a = add_norm(self.h, zero, self.norm_w) if self.between else self.h
        d = self.dims
        for layer in self.layers:
            qkv = self.linear(a, layer["qkv"])
            att = self.attention(qkv) if self.between else qkv[:, : d["HIDDEN"]].contiguous()
            o = self.linear(att, layer["o"])
            a = add_norm(self.h, o, self.norm_w) if self.between else o
            gu = self.linear(a, layer["gate_up"])
            act = silu_mul(gu) if self.between else gu[:, : d["INTER"]].contiguous()
            dn = self.linear(act, layer["down"])
            a = add_norm(self.h, dn, self.norm_w) if self.between else dn
        return a


def quantized(x, p):
    return ops.qlinear_prepared(x, p)


def dense(x, w):
    return F.linear(x, w)


def step_time(step, replays):
    """Median microseconds of one step: eager twice (compiles; the first run forms the prefetch links), then the
    step captured in a CUDA graph and replayed.  CPU (--smoke): the eager runs only, time 0."""
    out = None
    for _ in range(2):
        out = step.run()
    if not step.h.is_cuda:
        return 0.0, out.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step.run()
    us = replay_median(graph, replays)
    return us, out.clone()


def variants(args):
    caps = [c for c in args.caps.split(",") if c]
    rows = [("off", "0", "0")] + [(f"xpf {c}", c, "0") for c in caps]
    if args.pdl is not None:
        rows += [("pdl", "0", "1")] + [(f"pdl + xpf {c}", c, "1") for c in args.pdl.split(",") if c]
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,8,32", help="sequences per step (decode batch)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512, help="KV-cache tokens per sequence")
    ap.add_argument("--fraction", type=float, default=0.005, help="outlier fraction")
    ap.add_argument("--caps", default="4,8,16,32,16:all,16:lines", help="$QUANTEASE_XPREFETCH values to time")
    ap.add_argument("--pdl", default=None, metavar="CAPS",
                    help="also $QUANTEASE_PDL=1 alone and with each of these $QUANTEASE_XPREFETCH values")
    ap.add_argument("--between", default="vllm", choices=("vllm", "none"))
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds after which no new variant starts")
    ap.add_argument("--no-fp16", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET, small dims, 2 layers")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.time()
    device = "cpu" if args.smoke else "cuda"
    dims = SMOKE if args.smoke else dict(HIDDEN=HIDDEN, HEADS=HEADS, KV_HEADS=KV_HEADS, HEAD_DIM=HEAD_DIM, INTER=INTER)
    layers = make_layers(2 if args.smoke else args.layers, args.fraction, device, dims)
    between = args.between == "vllm"
    writer, fh = None, None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        fh = open(os.path.join(args.out, f"xprefetch_{args.between}.csv"), "w", newline="")
        writer = csv.writer(fh)
        writer.writerow(["m", "variant", "xprefetch", "pdl", "us_step", "us_layer", "vs_off", "fp16_over_this",
                         "max_rel_diff"])
    if torch.cuda.is_available():
        print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    print(f"{len(layers)} layers, ctx {args.ctx}, outliers {args.fraction}, between: {args.between}", flush=True)
    print(f"{'M':>3} {'variant':<18} {'us/step':>9} {'us/layer':>9} {'vs off':>7} {'fp16/this':>9} {'rel diff':>9}")
    for m in [int(v) for v in args.ms.split(",")]:
        fp16_us = None
        if not args.no_fp16 and not args.smoke:
            dl = fp16_layers(layers)
            fp16_us, _ = step_time(Step(dl, m, args.ctx, dims, between, dense, device), args.replays)
            del dl
            print(f"{m:>3} {'fp16':<18} {fp16_us:>9.1f} {fp16_us / len(layers):>9.2f}", flush=True)
        base_us, base_out = None, None
        for name, xpf, pdl in variants(args):
            if time.time() - t0 > args.deadline:
                print(f"deadline: M = {m} {name} and later variants skipped", flush=True)
                break
            os.environ[xprefetch.ENV], os.environ["QUANTEASE_PDL"] = xpf, pdl
            us, out = step_time(Step(layers, m, args.ctx, dims, between, quantized, device), args.replays)
            diff = ((out.float() - base_out.float()).norm() / base_out.float().norm()).item() if base_out is not None \
                else 0.0
            if base_us is None:
                base_us, base_out = us, out
            ratio = base_us / us if us else 0.0
            f16 = fp16_us / us if fp16_us and us else 0.0
            flag = "  MISMATCH" if not diff < 1e-2 else ""  # split-K atomics: not bitwise across PDL variants
            print(f"{m:>3} {name:<18} {us:>9.1f} {us / len(layers):>9.2f} {ratio:>7.3f} {f16:>9.3f} {diff:>9.1e}"
                  + flag, flush=True)
            if writer:
                writer.writerow([m, name, xpf, pdl, f"{us:.1f}", f"{us / len(layers):.2f}", f"{ratio:.3f}",
                                 f"{f16:.3f}", f"{diff:.1e}"])
                fh.flush()
        os.environ[xprefetch.ENV] = "0"
    if args.smoke:
        linked = sum(xprefetch.successor(p) is not None for layer in layers for p in layer.values())
        print(f"smoke: {linked} links (none: the CPU torch path takes no part, links form on the Triton path)", flush=True)


if __name__ == "__main__":
    if "--smoke" in sys.argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    main()
