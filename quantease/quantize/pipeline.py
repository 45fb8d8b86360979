"""`quantease quantize MODEL --out DIR`: sequential, block-by-block quantization of a whole HF decoder.

1. Calibration ids [nsamples, seqlen] (quantize.calib).
2. One forward of sample 0 through the whole model records the extra arguments every block gets
   (attention mask, position embeddings/ids: they can differ per block, e.g. Gemma 3's sliding layers);
   then the inputs of block 0 are caught for every sample (a hook that stops the forward).
3. Block by block (only one block on the device at a time): Σ = Σ xᵀx (float32 sums) of each linear's
   inputs from forward hooks, quantize_weight on each linear, the dequantized weight written back, and
   the quantized block's outputs become the next block's inputs (GPTQ convention).
   Default: all linears of a block quantized from one pass (Σ from the fp block inputs through the
   not-yet-quantized block).  --true-sequential: groups in dependency order (q/k/v, o, gate/up,
   down) with Σ recomputed after each group, so later layers see already-quantized earlier ones.
   --target fp (asymmetric objective, as in GPTAQ): a second activation stream, the block inputs of the
   full-precision model, runs through an unquantized copy of each block; each linear minimises
   ||W X_fp - Ŵ X_q||² (X_fp: its inputs in the fp model, X_q: in the quantized one, same tokens), so it
   compensates the error of the layers quantized before it instead of copying W.  That objective is
   ||(W_eff - Ŵ) X_q||² + const with W_eff = W + W (Σ_fq - Σ_q) Σ_q⁻¹ (Σ_fq = X_fp X_qᵀ; Σ_q damped like
   GPTQ's), so quantize_weight(W_eff, Σ_q) solves it unchanged; --target-alpha α applies α of that correction
   (GPTAQ's α, default 0.25).  --target q: ||W X_q - Ŵ X_q||² (GPTQ).  Default: fp for quantease, q for gptq/rtn.
4. --lm-head BITS: the lm_head too, after the last block, the same way on its inputs (the last block's outputs
   through the module found between them, the final norm); untied from the embeddings if it shared their weight.
5. quantease.format.checkpoint.write_checkpoint (atomic), with the per-layer table in the report.

Resume: after each block the results so far and the next block's inputs are saved atomically into
DIR.partial/; a rerun with the same settings continues from there and writes the same checkpoint.
"""
import copy
import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path

import torch

from quantease.errors import QuantEaseError
from quantease.quantize import DEFAULTS, calib, discover
from quantease.quantize.result import QuantizedWeight

METHODS = ("quantease", "gptq", "rtn")
TARGETS = ("fp", "q")
# --target default per method: fp for quantease (SmolLM2 3-bit, 16 x 512 calibration, 8 WikiText-2 windows:
# excess ppl over fp16 25.5 vs 32.7 with q); gptq/rtn stay the standard algorithms (the baselines)
DEFAULT_TARGET = {"quantease": "fp", "gptq": "q", "rtn": "q"}
# --target fp: fraction of the correction W (Σ_fq - Σ_q) Σ_q⁻¹ applied (GPTAQ's α; its default 0.25).  The full
# correction (1.0) fitted on 16 x 512 calibration tokens blew SmolLM2 3-bit GPTQ up to ppl 4489 (vs 54 with
# target q): it overfits the calibration tokens, widens W's range for the grid, and each block's larger
# error makes the next correction larger still.
TARGET_ALPHA = 0.25
INTERRUPT_ENV = "QUANTEASE_INTERRUPT_AFTER_BLOCK"  # tests: simulate a crash after this block is saved
STATE_VERSION = 1


class StopForward(Exception):
    pass


# ---------------------------------------------------------------- CLI

def add_arguments(p):
    p.add_argument("model", help="Hugging Face model folder (or a Hub id when the Hub is reachable)")
    p.add_argument("--out", required=True, help="output folder of the quantized checkpoint")
    p.add_argument("--method", default="quantease", choices=METHODS)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=-1, help="input columns per scale; -1: per output channel")
    p.add_argument("--sym", action="store_true", help="symmetric grid (no zeros stored)")
    p.add_argument("--outliers", type=float, default=None, metavar="FRACTION",
                   help="fraction of weights kept as fp16 outliers (quantease only; default 0.005 for "
                        "quantease, 0 otherwise)")
    p.add_argument("--structured-outliers", action="store_true", help="outliers on shared input columns")
    p.add_argument("--sweeps", type=int, default=None, help="QuantEase coordinate-descent sweeps")
    p.add_argument("--damp", type=float, default=0.01, help="relative diagonal damping of Σ")
    p.add_argument("--true-sequential", action="store_true",
                   help="recompute Σ after each group of linears (q/k/v, o, gate/up, down)")
    p.add_argument("--target", default=None, metavar="{fp,q}",  # checked in check_options: one-line error
                   help="what each layer's output should match: fp = the full-precision model's "
                        "(min ||W X_fp - Ŵ X_q||², corrects the error of earlier layers; GPTAQ), q = W applied "
                        "to the quantized model's own inputs (min ||W X_q - Ŵ X_q||², GPTQ); "
                        f"default per method: {DEFAULT_TARGET}")
    p.add_argument("--target-alpha", type=float, default=TARGET_ALPHA, metavar="A",
                   help="--target fp: fraction of the fp-output correction applied, in (0, 1] (1: the exact "
                        f"minimiser on the calibration tokens; default {TARGET_ALPHA}, as GPTAQ)")
    p.add_argument("--calib", required=True,
                   help="calibration text: a .txt file, a .jsonl file with a \"text\" field, 'self' "
                        "(data-free: text the model samples itself), or a dataset name (needs `datasets` and the Hub)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lm-head", type=int, default=None, metavar="BITS",
                   help="also quantize the output layer (lm_head) at BITS bits -- the run's method, group size and "
                        "grid, no outliers; unties it from the input embeddings (default: the lm_head stays 16-bit)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args):
    quantize_model(args.model, args.out, method=args.method, bits=args.bits, group_size=args.group_size,
                   sym=args.sym, outliers=args.outliers, structured_outliers=args.structured_outliers,
                   sweeps=args.sweeps, damp=args.damp, true_sequential=args.true_sequential, target=args.target,
                   target_alpha=args.target_alpha, calib_spec=args.calib,
                   nsamples=args.nsamples, seqlen=args.seqlen, device=args.device, seed=args.seed,
                   lm_head=args.lm_head, overwrite=args.overwrite)
    return 0


# ---------------------------------------------------------------- checks and loading

def pick_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise QuantEaseError(f"--device {device!r} is not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantEaseError(f"--device {device}: CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise QuantEaseError(f"--device {device}: only cpu and cuda are supported")
    return dev


def check_model_path(model_path):
    """A local folder with config.json, or something that can only be a Hub id (org/name)."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QuantEaseError(f"model folder {path} has no config.json")
        return str(path), True
    looks_like_hub_id = str(model_path).count("/") == 1 and not str(model_path).startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise QuantEaseError(f"model folder {model_path} not found")
    return str(model_path), False


def check_hub(model_id):
    """A Hub id needs its files in the local HF cache or a reachable Hub: fail fast instead of retrying."""
    import socket
    from urllib.parse import urlparse

    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_id, local_files_only=True)
        return  # cached
    except Exception:
        pass
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise QuantEaseError(f"model folder {model_id} not found, and the Hugging Face Hub ({host}) is not "
                             f"reachable to download it; give a local model folder") from None


def compute_dtype(config, device):
    """float32 on CPU (half matmuls are slow or missing there); the model's half dtype on CUDA."""
    if device.type == "cpu":
        return torch.float32
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return torch.bfloat16 if dtype in (torch.bfloat16, "bfloat16") else torch.float16


def save_dtype(config):
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return torch.bfloat16 if dtype in (torch.bfloat16, "bfloat16") else torch.float16


def load_model(model_path, local, device):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = "model folder" if local else "model (Hub id; no local folder of that name)"
    if not local:
        check_hub(model_path)
    try:
        config = AutoConfig.from_pretrained(model_path)
    except Exception as e:
        raise QuantEaseError(f"{where} {model_path}: cannot read its config "
                             f"({type(e).__name__}: {first_line(e)})") from None
    dtype = compute_dtype(config, device)
    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "not supported" in str(e):
            raise QuantEaseError(
                f"unsupported architecture {getattr(config, 'model_type', '?')}: quantease quantize needs a "
                f"Hugging Face decoder-only causal LM (tested: {discover.TESTED})") from None
        raise QuantEaseError(f"{where} {model_path}: cannot load ({first_line(e)})") from None
    except Exception as e:
        raise QuantEaseError(f"{where} {model_path}: cannot load ({type(e).__name__}: {first_line(e)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as e:
        tokenizer = None
        tokenizer_error = f"{type(e).__name__}: {first_line(e)}"
    else:
        tokenizer_error = None
    model.eval()
    model.config.use_cache = False
    return model, tokenizer, tokenizer_error


@contextmanager
def quiet_loading():
    """No transformers "Loading weights" bar: an error after it must still print as one line."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_options(method, bits, group_size, outliers, structured_outliers, sweeps, nsamples, seqlen, target="q",
                  target_alpha=TARGET_ALPHA, lm_head=None):
    from quantease.quantize import grid

    grid.check_bits(bits)
    if lm_head is not None:
        try:
            grid.check_bits(lm_head)
        except QuantEaseError as e:
            raise QuantEaseError(f"--lm-head: {e}") from None
    if method not in METHODS:
        raise QuantEaseError(f"--method {method}: choose one of {METHODS}")
    if target not in TARGETS:
        raise QuantEaseError(f"--target {target}: choose one of {TARGETS}")
    if not (isinstance(target_alpha, (int, float)) and 0 < target_alpha <= 1):
        raise QuantEaseError(f"--target-alpha {target_alpha}: must be in (0, 1]")
    if not (group_size == -1 or group_size > 0):
        raise QuantEaseError(f"--group-size {group_size}: use -1 (per channel) or a positive number")
    if not 0 <= outliers < 0.5:
        raise QuantEaseError(f"--outliers {outliers}: must be a fraction in [0, 0.5)")
    if outliers > 0 and method != "quantease":
        raise QuantEaseError(f"--outliers needs --method quantease (got --method {method})")
    if structured_outliers and outliers == 0:
        raise QuantEaseError("--structured-outliers needs --outliers > 0")
    if sweeps is not None and sweeps < 1:
        raise QuantEaseError(f"--sweeps {sweeps}: must be >= 1")
    if nsamples < 1 or seqlen < 2:
        raise QuantEaseError(f"--nsamples must be >= 1 and --seqlen >= 2 (got {nsamples}, {seqlen})")


# ---------------------------------------------------------------- moving modules

def move_outside(model, blocks, device):
    """Move every parameter and buffer that is not inside the block stack (embeddings, norms, rotary)."""
    def visit(m):
        if m is blocks:
            return
        for k, p in m._parameters.items():
            if p is not None:
                p.data = p.data.to(device)
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = b.to(device)
        for c in m.children():
            visit(c)
    visit(model)


def to_device(x, device):
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


# ---------------------------------------------------------------- capturing block inputs

def split_hidden(args, kwargs):
    """(hidden states, other positional args, other kwargs) of a block call."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def block_call_args(model, blocks, ids0, device, tail=None):
    """[(args, kwargs)] each block gets besides its hidden states, from one forward of sample 0.
    tail (a dict): also catch the last block's output ("last") and the lm_head's input ("head"), to find what
    runs between them (quantize_head)."""
    calls, hooks = [None] * len(blocks), []

    def pre(i):
        def hook(module, args, kwargs):
            _, rest, kw = split_hidden(args, kwargs)
            calls[i] = (rest, kw)
            module.to(device)
        return hook

    def post(module, args, output):
        if device.type != "cpu":
            module.to("cpu")

    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
        hooks.append(block.register_forward_hook(post))
    if tail is not None:
        def last(module, args, output):
            tail["last"] = (output[0] if isinstance(output, (tuple, list)) else output).detach()

        def head(module, args):
            tail["head"] = args[0].detach()
        hooks.append(blocks[-1].register_forward_hook(last))
        hooks.append(model.get_output_embeddings().register_forward_pre_hook(head))
    try:
        with torch.no_grad():
            model(ids0.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise QuantEaseError(f"blocks {missing} of the block stack were not called by the model's forward; "
                             f"this architecture is not supported (tested: {discover.TESTED})")
    return calls


def first_block_inputs(model, blocks, ids, device, store):
    """Hidden states entering block 0, one [1, seqlen, hidden] tensor per sample, kept on `store`."""
    inputs = []

    def hook(module, args, kwargs):
        hs, _, _ = split_hidden(args, kwargs)
        inputs.append(hs.detach().to(store))
        raise StopForward

    h = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(ids.shape[0]):
                try:
                    model(ids[i:i + 1].to(device), use_cache=False)
                except StopForward:
                    pass
    finally:
        h.remove()
    return inputs


def run_block(block, hs, call, device):
    args, kwargs = call
    out = block(hs.to(device), *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------- one block

_HALF = (torch.float16, torch.bfloat16)
_mm_out_dtype = []  # [bool] once known: does torch.mm(half, half, out_dtype=float32) run on this build


def add_xtx(sigma, a, b):
    """sigma += aᵀ b (float32 [K, K]); a, b [T, K] in the activation dtype.  Half inputs on CUDA go through
    the tensor cores with float32 accumulation and output (torch.mm out_dtype): the products of two halves are
    exact in float32, so this is the float32 sum in another order, ~10x faster than upcasting first (Σ of the
    8B shape's down_proj, K = 14336, is ~110 TFLOP per stream over 128 x 2048 tokens)."""
    if a.is_cuda and a.dtype in _HALF and b.dtype == a.dtype:
        if not _mm_out_dtype:
            try:
                one = torch.ones(1, 1, dtype=a.dtype, device=a.device)
                torch.mm(one, one, out_dtype=torch.float32)
                _mm_out_dtype.append(True)
            except (TypeError, RuntimeError, NotImplementedError):  # older torch: no out_dtype
                _mm_out_dtype.append(False)
        if _mm_out_dtype[0]:
            sigma += torch.mm(a.t(), b, out_dtype=torch.float32)
            return
    sigma.addmm_(a.t().to(torch.float32), b.to(torch.float32))


def add_sigmas(sigmas, key, xq, xf=None):
    """sigmas[key] += (Σ_q,) or, with xf (target fp), (Σ_q, Σ_fq, Σ_fp) of one sample's inputs [T, K]:
    Σ_q = x_qᵀx_q, Σ_fq = x_fpᵀx_q, Σ_fp = x_fpᵀx_fp, float32 [K, K], made at the first sample."""
    if key not in sigmas:
        sigmas[key] = tuple(torch.zeros(xq.shape[1], xq.shape[1], dtype=torch.float32, device=xq.device)
                            for _ in range(1 if xf is None else 3))
    add_xtx(sigmas[key][0], xq, xq)
    if xf is not None:
        add_xtx(sigmas[key][1], xf, xq)
        add_xtx(sigmas[key][2], xf, xf)


def accumulate_sigmas(block, groups, inputs, call, device):
    """{first linear name of each group: Σ xᵀx float32 [K, K]} over all calibration samples."""
    sigmas, hooks = {}, []

    def hook(name):
        def add(module, args):
            add_sigmas(sigmas, name, args[0].detach().reshape(-1, args[0].shape[-1]))
        return add

    for group in groups:
        hooks.append(block.get_submodule(group[0]).register_forward_pre_hook(hook(group[0])))
    try:
        with torch.no_grad():
            for hs in inputs:
                run_block(block, hs, call, device)
    finally:
        for h in hooks:
            h.remove()
    return {name: s[0] for name, s in sigmas.items()}


def accumulate_sigmas_fp(block, fp_block, groups, inputs, fp_inputs, call, device):
    """Target fp: {first linear name of each group: (Σ_q, Σ_fq, Σ_fp)} float32 [K, K], with
    Σ_q = Σ x_qᵀx_q, Σ_fq = Σ x_fpᵀx_q, Σ_fp = Σ x_fpᵀx_fp; x_fp: the group's input in fp_block (the unquantized
    block) run on the fp stream, x_q: in `block` on the q stream, token by token the same sample."""
    sigmas, caught, hooks = {}, {}, []

    def catch(name):
        def hook(module, args):
            x = args[0].detach()
            caught.setdefault(name, []).append(x.reshape(-1, x.shape[-1]))
        return hook

    def add(name):
        def hook(module, args):
            add_sigmas(sigmas, name, args[0].detach().reshape(-1, args[0].shape[-1]), caught[name].pop(0))
        return hook

    for group in groups:
        hooks.append(fp_block.get_submodule(group[0]).register_forward_pre_hook(catch(group[0])))
        hooks.append(block.get_submodule(group[0]).register_forward_pre_hook(add(group[0])))
    try:
        with torch.no_grad():
            for hs_q, hs_fp in zip(inputs, fp_inputs):
                run_block(fp_block, hs_fp, call, device)
                run_block(block, hs_q, call, device)
                caught.clear()
    finally:
        for h in hooks:
            h.remove()
    return sigmas


def fp_target_weight(w, sigma_q, sigma_fq, damp, alpha=1.0):
    """W_eff = W + α W (Σ_fq - Σ_q) (Σ_q + λI)⁻¹, λ = damp · mean diag Σ_q (GPTQ's damping): with α = 1 the
    minimiser of ||W X_fp - Ŵ X_q||² over Ŵ (exact when λ = 0); α < 1 shrinks the correction toward W (GPTAQ's
    α).  W itself when Σ_fq = Σ_q (no error before this layer)."""
    delta = (sigma_fq - sigma_q).to(torch.float64)
    if not bool(delta.any()):
        return w
    s = sigma_q.to(torch.float64)
    mean = float(torch.diagonal(s).mean())
    lam = max(damp, 1e-6) * mean if mean > 0 else 1e-12
    s = s + lam * torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    chol, bad = torch.linalg.cholesky_ex(s)
    if int(bad):
        raise QuantEaseError("the damped Σ of a layer's inputs is not positive definite; raise --damp")
    wd = w.to(torch.float64) @ delta  # [N, K]
    corr = torch.cholesky_solve(wd.t(), chol).t()  # W Δ Σ⁻¹ (Σ symmetric)
    return (w.to(torch.float64) + alpha * corr).to(torch.float32)


def fp_target_error(w, deq, sigma_q, sigma_fq, sigma_fp):
    """||W X_fp - Ŵ X_q||² / ||W X_fp||² from the three Σ (float64 trace terms)."""
    w, deq = w.to(torch.float64), deq.to(torch.float64)
    sq, sfq, sfp = (s.to(torch.float64) for s in (sigma_q, sigma_fq, sigma_fp))
    base = float(((w @ sfp) * w).sum())
    f = float(((deq @ sq) * deq).sum()) - 2 * float(((w @ sfq) * deq).sum()) + base
    return f / base if base > 0 else float("nan") if f > 0 else 0.0


def quantize_linear(module, sigma, opts, fp_sigmas=None):
    """fp_sigmas (target fp): (Σ_fq, Σ_fp); sigma is Σ_q; opts then also hold target_alpha.  Row rel_error: the
    objective's relative error, ||W X_q - Ŵ X_q||² / ||W X_q||² (target q) or ||W X_fp - Ŵ X_q||² / ||W X_fp||²
    (target fp, the full objective whatever α)."""
    from quantease.quantize import layer_error, quantize_weight

    opts = dict(opts)
    alpha = opts.pop("target_alpha", None)
    w = discover.get_weight(module).to(torch.float32)
    t0 = time.time()
    w_target = w if fp_sigmas is None else fp_target_weight(w, sigma, fp_sigmas[0], opts["damp"], alpha)
    qw = quantize_weight(w_target, sigma, **opts)
    seconds = time.time() - t0
    # grid.fit already fits fp16-representable scales, so `deq` (written back, and what the next blocks'
    # calibration inputs flow through) and the reported error are exactly the stored model's
    deq = qw.dequantize()
    if fp_sigmas is None:
        _, rel = layer_error(w, deq, sigma)
    else:
        rel = fp_target_error(w, deq, sigma, *fp_sigmas)
    discover.set_weight(module, deq)
    return qw_to(qw, "cpu"), dict(rel_error=rel, seconds=seconds)


def quantize_block(block, prefix, inputs, call, device, opts, true_sequential, pbar=None, fp_block=None,
                   fp_inputs=None):
    """Quantize every linear of one block in place; {full name: QuantizedWeight}, {full name: row}.
    fp_block, fp_inputs (target fp): an unquantized copy of the block and the fp stream's inputs."""
    groups = discover.linear_groups(block, lambda: run_block(block, inputs[0], call, device))
    passes = [[g] for g in groups] if true_sequential else [groups]
    results, rows = {}, {}
    for pass_groups in passes:
        if fp_block is None:
            sigmas = {k: (v, None) for k, v in accumulate_sigmas(block, pass_groups, inputs, call, device).items()}
        else:
            sigmas = {k: (v[0], v[1:]) for k, v in
                      accumulate_sigmas_fp(block, fp_block, pass_groups, inputs, fp_inputs, call, device).items()}
        for group in pass_groups:
            sigma, fp_sigmas = sigmas[group[0]]
            for name in group:
                module = block.get_submodule(name)
                qw, row = quantize_linear(module, sigma, opts, fp_sigmas)
                full = f"{prefix}.{name}"
                results[full] = qw
                rows[full] = dict(shape=list(qw.shape), outliers=qw.num_outliers,
                                  bits_per_weight=qw.bits_per_weight, **row)
                if pbar is not None:
                    pbar.update(1)
    return results, rows


def block_outputs(block, inputs, call, device, store):
    with torch.no_grad():
        return [run_block(block, hs, call, device).detach().to(store) for hs in inputs]


# ---------------------------------------------------------------- the lm_head (--lm-head BITS)

def module_name(model, module):
    return next(name for name, m in model.named_modules() if m is module)


def find_head_input(model, blocks, tail):
    """The module between the last block and the lm_head (the final norm, or nothing), found by trying the
    leaf modules outside the block stack on sample 0's last block output until one gives the lm_head's input
    (tail from block_call_args; the modules outside the stack still on its device)."""
    last, want = tail["last"], tail["head"]
    inside = {id(m) for m in blocks.modules()} | {id(model.get_output_embeddings())}
    named = [(n, m) for n, m in model.named_modules() if id(m) not in inside and not list(m.children())]
    named.sort(key=lambda nm: "norm" not in nm[0] and "ln" not in nm[0])  # the usual names first
    tol = 1e-3 * float(want.abs().max()) + 1e-6
    for name, m in [("", torch.nn.Identity())] + named:
        try:
            with torch.no_grad():
                got = m(last)
        except Exception:  # rotary embeddings, embeddings, ...: not a function of the hidden states
            continue
        if torch.is_tensor(got) and got.shape == want.shape and float((got - want).abs().max()) <= tol:
            return m
    raise QuantEaseError("--lm-head: cannot find what runs between the last block and the lm_head in "
                         f"{type(model).__name__} (no final norm reproduces its input); quantize without --lm-head")


def untie_head(model, head):
    """The lm_head gets its own weight when it shares the input embeddings' (the quantized one replaces it);
    write_checkpoint stores the tie target quantized and writes the config untied."""
    if head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)


def quantize_head(model, norm, inputs, fp_inputs, device, opts):
    """Quantize the lm_head on the final hidden states (the last block's outputs through `norm`), like one more
    group of a block: ({name: QuantizedWeight}, {name: row})."""
    head = model.get_output_embeddings()
    name = module_name(model, head)
    untie_head(model, head)
    head.to(device)
    norm.to(device)
    fp = fp_inputs is not None
    sigmas = {}
    with torch.no_grad():
        for i, hs in enumerate(inputs):
            xq = norm(hs.to(device)).reshape(-1, hs.shape[-1])
            xf = norm(fp_inputs[i].to(device)).reshape(-1, hs.shape[-1]) if fp else None
            add_sigmas(sigmas, name, xq, xf)
    s = sigmas[name]
    qw, row = quantize_linear(head, s[0], opts, s[1:] if fp else None)
    head.to("cpu")
    norm.to("cpu")
    return {name: qw}, {name: dict(shape=list(qw.shape), outliers=qw.num_outliers,
                                   bits_per_weight=qw.bits_per_weight, **row)}


# ---------------------------------------------------------------- resume state

def qw_to(qw, device):
    return replace(qw, **{f.name: getattr(qw, f.name).to(device) for f in fields(qw)
                          if torch.is_tensor(getattr(qw, f.name))})


def qw_state(qw):
    return {f.name: getattr(qw, f.name) for f in fields(qw)}


def atomic_save(obj, path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_json(obj, path):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def folder_stamp(path):
    """(name, size, mtime) of the files of the model folder: a changed model never resumes an old run."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(path).iterdir()) if p.is_file()]


def partial_dir(out):
    return out.with_name(out.name + ".partial")


def load_state(pdir, fingerprint):
    """(next block, calibration ids) of a matching earlier run, or (0, None)."""
    try:
        state = json.loads((pdir / "state.json").read_text())
    except (OSError, ValueError):
        return 0, None
    if state.get("fingerprint") != fingerprint:
        print(f"quantease quantize: {pdir} is from a run with other settings; starting over")
        return 0, None
    return state["next_block"], torch.load(pdir / "calib.pt")


def save_block(pdir, fingerprint, i, results, rows, next_inputs, next_fp_inputs=None):
    """Commit block i: its results, the inputs of block i+1 (both streams with target fp), then state.json
    (the commit point)."""
    atomic_save({"layers": {k: qw_state(v) for k, v in results.items()}, "rows": rows}, pdir / f"block_{i:04d}.pt")
    atomic_save([t.cpu() for t in next_inputs], pdir / f"inputs_{i + 1:04d}.pt")
    if next_fp_inputs is not None:
        atomic_save([t.cpu() for t in next_fp_inputs], pdir / f"fp_inputs_{i + 1:04d}.pt")
    atomic_json({"fingerprint": fingerprint, "next_block": i + 1}, pdir / "state.json")
    for old in (pdir / f"inputs_{i:04d}.pt", pdir / f"fp_inputs_{i:04d}.pt"):
        if old.exists():
            old.unlink()


class BlockSaver:
    """save_block on a worker thread while the next block runs (torch.save drops the GIL while it writes: the
    8B shape's next inputs are 2-4 GB a block, ~6 s of disk).  At most one save in flight: wait() before the next
    one, before the checkpoint and on any error or interrupt, so what is on disk is always a committed block."""

    def __init__(self, pdir):
        self.pdir, self.thread, self.error = pdir, None, None

    def submit(self, *args):
        self.wait()
        self.thread = threading.Thread(target=self._run, args=args, name="quantease-save")
        self.thread.start()

    def _run(self, *args):
        try:
            save_block(self.pdir, *args)
        except Exception as e:  # raised on the main thread by wait()
            self.error = e

    def wait(self, check=True):
        """Join the save in flight; check: raise its error (False: an error of the caller's is on its way)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        e, self.error = self.error, None
        if e is not None and check:
            raise QuantEaseError(f"could not save the resume state in {self.pdir}: {first_line(e)}") from None


def load_blocks(pdir, n):
    results, rows = {}, {}
    for i in range(n):
        saved = torch.load(pdir / f"block_{i:04d}.pt")
        results.update({k: QuantizedWeight(**v) for k, v in saved["layers"].items()})
        rows.update(saved["rows"])
    return results, rows


# ---------------------------------------------------------------- the whole model

def keep_on_device(n_values, device, streams=1):
    """Keep activations on the GPU only when inputs + outputs (of every stream) take under a quarter of its
    free memory."""
    if device.type == "cpu":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return streams * 2 * n_values * 2 < free / 4


def quantize_model(model_path, out_dir, *, method="quantease", bits=3, group_size=-1, sym=False, outliers=None,
                   structured_outliers=False, sweeps=None, damp=0.01, true_sequential=False, target=None,
                   target_alpha=TARGET_ALPHA, calib_spec, nsamples=128, seqlen=2048, device=None, seed=0,
                   lm_head=None, overwrite=False, progress=None):
    """Quantize a whole HF decoder into a quantease checkpoint at out_dir; returns the report dict.

    target: "fp" (each layer matches the full-precision model's output) or "q" (W on the quantized model's
    inputs); None: DEFAULT_TARGET[method].  lm_head: bits of the lm_head, quantized after the blocks (None: kept
    16-bit).  progress: show tqdm bars (None: only on a terminal)."""
    from tqdm.auto import tqdm

    from quantease.format.checkpoint import check_target, write_checkpoint

    if outliers is None:
        outliers = 0.005 if method == "quantease" else 0.0
    if target is None:
        target = DEFAULT_TARGET.get(method, "q")
    check_options(method, bits, group_size, outliers, structured_outliers, sweeps, nsamples, seqlen, target,
                  target_alpha, lm_head)
    model_path, local = check_model_path(model_path)
    if calib_spec != calib.SELF and (Path(calib_spec).suffix in (".txt", ".jsonl", ".raw")
                                     or str(calib_spec).startswith((".", "/", "~"))):
        if not Path(calib_spec).expanduser().is_file():
            raise QuantEaseError(f"calibration file {calib_spec} not found")
    out = Path(out_dir)
    check_target(out, overwrite)
    dev = pick_device(device)
    torch.manual_seed(seed)
    t_start = time.time()

    model, tokenizer, tokenizer_error = load_model(model_path, local, dev)
    block_name, blocks = discover.find_blocks(model)
    for i, block in enumerate(blocks):
        if not discover.find_linears(block):
            raise QuantEaseError(f"block {block_name}.{i} has no linear layers to quantize")
    opts = dict(bits=bits, method=method, group_size=group_size, sym=sym, outlier_fraction=outliers,
                structured_outliers=structured_outliers, sweeps=sweeps, damp=damp)
    if target == "fp":
        opts["target_alpha"] = target_alpha
    fingerprint = dict(version=STATE_VERSION, model=str(Path(model_path).resolve()) if local else model_path,
                       calib=str(calib_spec), nsamples=nsamples, seqlen=seqlen, seed=seed, device=dev.type,
                       dtype=str(next(model.parameters()).dtype), true_sequential=true_sequential, target=target,
                       files=folder_stamp(model_path) if local else None, lm_head=lm_head,
                       # a run left by older defaults (e.g. before grid refit) must not be resumed with new ones
                       defaults=repr(sorted(DEFAULTS.get(method, {}).items())), **opts)
    pdir = partial_dir(out)
    start, ids = load_state(pdir, fingerprint)
    if ids is None:
        if tokenizer is None and calib_spec != calib.SELF:
            raise QuantEaseError(f"model folder {model_path}: no usable tokenizer for the calibration text "
                                 f"({tokenizer_error})")
        if calib_spec == calib.SELF:
            model.to(dev)
            ids = calib.load(calib_spec, tokenizer or _BosOnly(model.config), nsamples, seqlen, seed, model=model)
            model.to("cpu")
        else:
            ids = calib.load(calib_spec, tokenizer, nsamples, seqlen, seed)
        vocab = model.get_input_embeddings().weight.shape[0]
        if int(ids.max()) >= vocab:
            raise QuantEaseError(f"the tokenizer of {model_path} gives token id {int(ids.max())}, outside the "
                                 f"model's {vocab} embeddings")
        if pdir.exists():
            shutil.rmtree(pdir)
        pdir.mkdir(parents=True)
        atomic_save(ids, pdir / "calib.pt")
        atomic_json({"fingerprint": fingerprint, "next_block": 0}, pdir / "state.json")
    else:
        print(f"quantease quantize: resuming from block {start} of {len(blocks)} ({pdir})")

    hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") else None
    fp_target = target == "fp"
    streams = 2 if fp_target else 1
    store = dev if keep_on_device(nsamples * seqlen * (hidden or 0), dev, streams) else torch.device("cpu")
    results, rows = load_blocks(pdir, start)
    for name, qw in results.items():  # blocks finished by an earlier run
        discover.set_weight(model.get_submodule(name), qw.dequantize())
    try:
        move_outside(model, blocks, dev)
        tail = {} if lm_head is not None else None
        calls = block_call_args(model, blocks, ids[:1], dev, tail)
        head_norm = find_head_input(model, blocks, tail) if tail is not None else None
        del tail
        if start == 0:
            inputs = first_block_inputs(model, blocks, ids, dev, store)
            fp_inputs = list(inputs) if fp_target else None  # the same tensors: block 0 sees the same inputs
        else:
            inputs = [t.to(store) for t in torch.load(pdir / f"inputs_{start:04d}.pt")]
            fp_inputs = ([t.to(store) for t in torch.load(pdir / f"fp_inputs_{start:04d}.pt")]
                         if fp_target else None)
        move_outside(model, blocks, "cpu")
    except torch.cuda.OutOfMemoryError:
        raise QuantEaseError("out of GPU memory while capturing the inputs of the blocks: lower --nsamples or "
                             "--seqlen, or use --device cpu") from None

    hide = None if progress is None else not progress
    bar = tqdm(range(start, len(blocks)), desc="blocks", initial=start, total=len(blocks), disable=hide)
    interrupt_after = os.environ.get(INTERRUPT_ENV)
    saver = BlockSaver(pdir)
    try:
        for i in bar:
            block = blocks[i]
            prefix = f"{block_name}.{i}" if block_name else str(i)
            try:
                block.to(dev)
                call = to_device(calls[i], dev)
                fp_block = copy.deepcopy(block) if fp_target else None  # stays unquantized: X_fp, fp outputs
                with tqdm(total=len(discover.find_linears(block)), desc=f"block {i}", leave=False,
                          disable=hide) as lbar:
                    res, rws = quantize_block(block, prefix, inputs, call, dev, opts, true_sequential, lbar,
                                              fp_block, fp_inputs)
                for r in rws.values():
                    r["target"] = target
                inputs = block_outputs(block, inputs, call, dev, store)
                if fp_target:
                    fp_inputs = block_outputs(fp_block, fp_inputs, call, dev, store)
                    del fp_block
                block.to("cpu")
            except torch.cuda.OutOfMemoryError:
                kept = f"; blocks 0-{i - 1} are saved in {pdir} and a rerun resumes there" if i else ""
                raise QuantEaseError(f"out of GPU memory on block {i} ({prefix}): lower --nsamples or --seqlen, "
                                     f"or use --device cpu{kept}") from None
            results.update(res)
            rows.update(rws)
            saver.submit(fingerprint, i, res, rws, inputs, fp_inputs)
            if interrupt_after is not None and int(interrupt_after) == i:
                saver.wait()
                raise KeyboardInterrupt(f"{INTERRUPT_ENV}={i}")
    except BaseException:
        saver.wait(check=False)  # the last block committed before the error goes on: a rerun resumes after it
        raise
    saver.wait()
    overrides = {}
    if lm_head is not None:
        head_opts = dict(opts, bits=lm_head, outlier_fraction=0.0, structured_outliers=False)
        try:
            res, rws = quantize_head(model, head_norm, inputs, fp_inputs, dev, head_opts)
        except torch.cuda.OutOfMemoryError:
            raise QuantEaseError(f"out of GPU memory on the lm_head: lower --nsamples or --seqlen, or use --device "
                                 f"cpu; the blocks are saved in {pdir} and a rerun resumes there") from None
        for name, r in rws.items():
            r["target"] = target
            overrides[name] = dict(bits=lm_head, outlier_fraction=0.0)
        results.update(res)
        rows.update(rws)

    seconds = time.time() - t_start
    print_table(rows, target)
    model.to(save_dtype(model.config))
    convert_conv1d(model, results)
    quant_config = dict(bits=bits, group_size=group_size, sym=sym, outlier_fraction=outliers,
                        structured_outliers=structured_outliers, method=method,
                        **({"overrides": overrides} if overrides else {}))

    sweeps = DEFAULTS.get(method, {}).get("sweeps") if sweeps is None else sweeps
    report = dict(seconds=seconds, sweeps=sweeps, damp=damp, true_sequential=true_sequential, target=target,
                  target_alpha=target_alpha if target == "fp" else None,
                  block_stack=block_name,
                  calibration=dict(source=str(calib_spec), nsamples=nsamples, seqlen=seqlen, seed=seed),
                  device=str(dev), layers=rows)
    write_checkpoint(out, model, results, quant_config=quant_config, source_dir=model_path if local else None,
                     report=report, overwrite=overwrite)
    shutil.rmtree(pdir, ignore_errors=True)
    print(f"quantease quantize: wrote {out} ({len(results)} linears, {seconds:.1f} s)")
    return report


class _BosOnly:
    """Stand-in tokenizer for --calib self on a folder without one: only the BOS/EOS ids are needed."""

    def __init__(self, config):
        self.bos_token_id = getattr(config, "bos_token_id", None)
        self.eos_token_id = getattr(config, "eos_token_id", None)


def convert_conv1d(model, results):
    """Quantized transformers Conv1D (GPT-2) -> nn.Linear with the same name, so the checkpoint writer
    sees [out, in] linears; their dense weights are not written anyway (the packed tensors replace them)."""
    for name in results:
        module = model.get_submodule(name)
        if not discover.is_conv1d(module):
            continue
        k, n = module.weight.shape
        linear = torch.nn.Linear(k, n, bias=module.bias is not None, dtype=module.weight.dtype)
        linear.weight.data.copy_(module.weight.data.t())
        if module.bias is not None:
            linear.bias.data.copy_(module.bias.data)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)


def print_table(rows, target="q"):
    # rel err: the objective's, ||W X_q - Ŵ X_q||²/||W X_q||² (target q) or ||W X_fp - Ŵ X_q||²/||W X_fp||² (fp)
    print(f"{'layer':<48} {'shape':>12} {'rel err ' + target:>9} {'outliers':>9} {'bits/w':>7} {'s':>6}")
    for name, r in rows.items():
        shape = "x".join(str(s) for s in r["shape"])
        print(f"{name:<48} {shape:>12} {r['rel_error']:>9.5f} {r['outliers']:>9d} "
              f"{r['bits_per_weight']:>7.3f} {r['seconds']:>6.2f}")
