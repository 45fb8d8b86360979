"""The quantized checkpoint: an HF folder whose quantized linears hold the packed tensors of format.layout.

    config.json               the model's config + quantization_config {"quant_method": "quantease", ...}
    model.safetensors         or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    quantease_report.json     version, method, bits/weight, sweeps, calibration, per-layer errors and seconds
    tokenizer*, generation_config.json, ...   copied from the source folder

Per quantized linear <prefix>: qweight, scales, zeros (asymmetric only), outlier_idx + outlier_val (R > 0 only),
bias (if the linear has one). Every other tensor is stored as the model holds it. docs/FORMAT.md has the details.

Also the `quantease dequantize DIR OUT` subcommand: a plain fp16 HF checkpoint from a quantized one.
"""
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from quantease.errors import QuantEaseError
from quantease.format import layout

QUANT_METHOD = "quantease"
FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_SIZE = 2 * 1024 ** 3
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
REPORT_FILE = "quantease_report.json"
# files copied from the source folder (tokenizer, chat template, generation defaults)
COPY_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "chat_template",
                 "generation_config", "preprocessor_config")
FLOAT = "float"  # spec dtype meaning "any floating dtype" (biases, unquantized tensors)


# ---------------------------------------------------------------- quant config

def check_quant_config(qc, where="quantization_config"):
    """The quantization_config of a checkpoint, checked; raises one QuantEaseError naming the problem."""
    if not isinstance(qc, Mapping):
        raise QuantEaseError(f"{where}: missing or not an object (not a quantease checkpoint)")
    if qc.get("quant_method") != QUANT_METHOD:
        raise QuantEaseError(f"{where}: quant_method is {qc.get('quant_method')!r}, expected {QUANT_METHOD!r}")
    if qc.get("format_version") != FORMAT_VERSION:
        raise QuantEaseError(f"{where}: format_version {qc.get('format_version')!r} is not supported "
                             f"(this quantease reads version {FORMAT_VERSION})")
    check_grid(qc, where)
    skip = qc.get("modules_to_not_convert")
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise QuantEaseError(f"{where}: modules_to_not_convert must be a list of module names")
    overrides = qc.get("overrides", {})
    if not isinstance(overrides, Mapping):
        raise QuantEaseError(f"{where}: overrides must be an object {{module name: {{grid keys}}}}")
    for name, o in overrides.items():
        if not isinstance(o, Mapping) or not set(o) <= set(GRID_KEYS):
            raise QuantEaseError(f"{where}: overrides[{name!r}] must be an object with keys among {GRID_KEYS}")
        check_grid(layer_config(qc, name), f"{where}: overrides[{name!r}]")
    return dict(qc)


GRID_KEYS = ("bits", "group_size", "sym", "outlier_fraction")  # what overrides may set per module


def check_grid(qc, where):
    if qc.get("bits") not in layout.SUPPORTED_BITS:
        raise QuantEaseError(f"{where}: bits={qc.get('bits')!r} is not one of {layout.SUPPORTED_BITS}")
    gs = qc.get("group_size")
    if not isinstance(gs, int) or isinstance(gs, bool) or not (gs == -1 or gs > 0):
        raise QuantEaseError(f"{where}: group_size={gs!r} must be -1 or a positive integer")
    if not isinstance(qc.get("sym"), bool):
        raise QuantEaseError(f"{where}: sym={qc.get('sym')!r} must be true or false")
    frac = qc.get("outlier_fraction")
    if not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0 <= frac < 1:
        raise QuantEaseError(f"{where}: outlier_fraction={frac!r} must be a number in [0, 1)")


def layer_config(qc, name):
    """The grid of module `name`: the checkpoint's, with that module's overrides (e.g. a 4-bit lm_head)."""
    return {**qc, **qc.get("overrides", {}).get(name, {})}


def is_skipped(name, modules_to_not_convert):
    """Exact module names, or a parent module name (its whole subtree stays unquantized)."""
    return any(name == s or name.startswith(s + ".") for s in modules_to_not_convert)


# ---------------------------------------------------------------- per-layer spec and packing

def layer_spec(n, k, qc, has_bias):
    """suffix -> (dtype, shape) of the tensors a quantized linear [N, K] holds under quant config qc."""
    bits, gs = qc["bits"], qc["group_size"]
    spec = {"qweight": (torch.int32, (n, layout.padded_k(k) // layout.RUN * bits)),
            "scales": (torch.float16, (n, layout.num_groups(k, gs)))}
    if not qc["sym"]:
        spec["zeros"] = (torch.uint8, (n, layout.num_groups(k, gs)))
    r = layout.outlier_slots(k, qc["outlier_fraction"])
    if r > 0:
        spec["outlier_idx"] = (layout.index_dtype(k), (n, r))
        spec["outlier_val"] = (torch.float16, (n, r))
    if has_bias:
        spec["bias"] = (FLOAT, (n,))
    return spec


def pack_layer(qw, outlier_fraction=None):
    """QuantizedWeight -> {suffix: tensor} as stored (no bias: the bias lives in the model).

    With outlier_fraction given, the outlier tensors are made exactly R = outlier_slots(K, fraction) wide
    (zero-valued slots when the weight has none), so every layer of a checkpoint has the same layout."""
    n, k = qw.shape
    layout.check_bits(qw.bits)
    maxq = 2 ** qw.bits - 1
    if int(qw.codes.max()) > maxq:
        raise QuantEaseError(f"codes exceed {maxq} for bits={qw.bits}")
    out = {"qweight": layout.pack_codes(qw.codes, qw.bits)}
    out["scales"] = qw.scale.to(torch.float16).contiguous()
    zero = qw.zero.to(torch.float32)
    if qw.sym:
        if not torch.all(zero == 2 ** (qw.bits - 1)):
            raise QuantEaseError(f"symmetric grid needs zero == {2 ** (qw.bits - 1)} everywhere")
    else:
        if not torch.all((zero == zero.round()) & (zero >= 0) & (zero <= maxq)):
            raise QuantEaseError(f"zeros must be integers in [0, {maxq}]")
        out["zeros"] = zero.to(torch.uint8).contiguous()
    idx, val = qw.outlier_idx, qw.outlier_val
    r = None if outlier_fraction is None else layout.outlier_slots(k, outlier_fraction)
    if idx is None and r:
        idx = torch.zeros(n, r, dtype=torch.int64)
        val = torch.zeros(n, r, dtype=torch.float16)
    if idx is not None and r is not None and idx.shape[1] != r:
        raise QuantEaseError(f"{idx.shape[1]} outlier slots per row, but outlier_fraction="
                             f"{outlier_fraction} gives R={r} for K={k}")
    if idx is not None and idx.shape[1] > 0:
        out["outlier_idx"] = idx.to(layout.index_dtype(k)).contiguous()
        out["outlier_val"] = val.to(torch.float16).contiguous()
    return out


def packed_bits(tensors, n, k):
    """Storage bits per weight of one packed layer, counted as layout says (no bias)."""
    total = sum(t.numel() * t.element_size() * 8 for name, t in tensors.items() if name != "bias")
    return total / (n * k)


def check_layer_content(prefix, tensors, k, bits, where):
    """Values of one quantized layer's tensors; raises one QuantEaseError naming file and tensor."""
    def bad(suffix, problem):
        raise QuantEaseError(f"{where}: tensor '{prefix}.{suffix}' {problem}")

    if not torch.isfinite(tensors["scales"]).all():
        bad("scales", "has NaN/Inf values")
    if "zeros" in tensors and int(tensors["zeros"].max()) > 2 ** bits - 1:
        bad("zeros", f"has values above {2 ** bits - 1} (bits={bits})")
    if "outlier_idx" in tensors:
        idx = tensors["outlier_idx"]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= k):
            bad("outlier_idx", f"has column indices outside [0, {k})")
        if idx.shape[1] > 1 and bool((idx[:, 1:] < idx[:, :-1]).any()):
            bad("outlier_idx", "is not non-decreasing within a row")
        if not torch.isfinite(tensors["outlier_val"]).all():
            bad("outlier_val", "has NaN/Inf values")
    if "bias" in tensors and not torch.isfinite(tensors["bias"]).all():
        bad("bias", "has NaN/Inf values")


# ---------------------------------------------------------------- expected tensors of a whole model

def meta_model(config_dict):
    """The model built on the meta device from a config dict (no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = {k: v for k, v in config_dict.items() if k != "quantization_config"}
    if "model_type" not in d:
        raise QuantEaseError("config.json has no model_type")
    try:
        config = AutoConfig.for_model(d.pop("model_type"), **d)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        raise QuantEaseError(f"config.json does not describe a causal LM transformers can build: {e}") from None


def linear_dims(module):
    """(out_features, in_features) of an nn.Linear or a transformers Conv1D (GPT-2, weight [in, out]); else None."""
    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        k, n = module.weight.shape
        return n, k
    return None


def linears(model):
    """name -> module of every linear layer (nn.Linear, Conv1D) of the model."""
    return {name: m for name, m in model.named_modules() if linear_dims(m) is not None}


def quantized_linears(model, qc):
    """name -> module of the linears the checkpoint stores quantized."""
    skip = qc["modules_to_not_convert"]
    return {name: m for name, m in linears(model).items() if not is_skipped(name, skip)}


def expected_tensors(model, qc):
    """(quantized, spec): quantized = {prefix: (N, K)}; spec = {tensor name: (dtype or FLOAT, shape)}.

    `model` is the plain (meta) model; tied targets (e.g. lm_head.weight tied to the embeddings) are not
    stored, as in save_pretrained."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    spec, quantized = {}, {}
    for prefix, m in quantized_linears(model, qc).items():
        if f"{prefix}.weight" in tied:
            raise QuantEaseError(f"{prefix} is tied to another weight and cannot be quantized; "
                                 f"list it in modules_to_not_convert")
        n, k = quantized[prefix] = linear_dims(m)
        for suffix, s in layer_spec(n, k, layer_config(qc, prefix), m.bias is not None).items():
            spec[f"{prefix}.{suffix}"] = s
    for name, t in model.state_dict().items():
        prefix = name.rpartition(".")[0]
        if name in tied or prefix in quantized:
            continue
        spec[name] = (t.dtype if not t.is_floating_point() else FLOAT, tuple(t.shape))
    return quantized, spec


# ---------------------------------------------------------------- reading

def weight_files(ckpt_dir):
    """{tensor name: file path} from the index, or from the single file's header."""
    d = Path(ckpt_dir)
    index = d / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise QuantEaseError(f"{index}: not a valid safetensors index ({e})") from None
        for f in set(weight_map.values()):
            if not (d / f).is_file():
                raise QuantEaseError(f"{index}: lists {f}, which is missing")
        return {k: d / f for k, f in weight_map.items()}
    single = d / SINGLE_FILE
    if not single.is_file():
        raise QuantEaseError(f"{d}: no {SINGLE_FILE} or {INDEX_FILE}")
    return {k: single for k in read_header(single)}


def read_header(path):
    """{name: (dtype, shape)} of one safetensors file; a corrupt or truncated file -> QuantEaseError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise QuantEaseError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


SAFE_DTYPES = {"I32": torch.int32, "I16": torch.int16, "U8": torch.uint8, "I64": torch.int64, "I8": torch.int8,
               "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
               "BOOL": torch.bool}


def check_headers(files, spec):
    """Every expected tensor present exactly, with the expected dtype and shape; nothing unexpected."""
    headers = {}
    for path in sorted(set(files.values())):
        headers.update({k: (v, path) for k, v in read_header(path).items()})
    for name, path in files.items():
        if name not in headers:
            raise QuantEaseError(f"{path}: tensor '{name}' is listed in the index but missing from the file")
    for name, (_, path) in headers.items():
        if files.get(name) != path:
            raise QuantEaseError(f"{path}: tensor '{name}' is not listed for this file in {INDEX_FILE}")
    for name, (dtype, shape) in spec.items():
        if name not in headers:
            raise QuantEaseError(f"{Path(next(iter(files.values()))).parent}: tensor '{name}' is missing")
        (sdtype, sshape), path = headers[name]
        got = SAFE_DTYPES.get(sdtype)
        if dtype == FLOAT:
            if got is None or not got.is_floating_point:
                raise QuantEaseError(f"{path}: tensor '{name}' has dtype {sdtype}, expected a float dtype")
        elif got != dtype:
            raise QuantEaseError(f"{path}: tensor '{name}' has dtype {sdtype}, expected {dtype}")
        if sshape != tuple(shape):
            raise QuantEaseError(f"{path}: tensor '{name}' has shape {list(sshape)}, expected {list(shape)} "
                                 f"(does quantization_config match the weights?)")
    extra = sorted(set(headers) - set(spec))
    if extra:
        raise QuantEaseError(f"{headers[extra[0]][1]}: unexpected tensor '{extra[0]}' "
                             f"({len(extra)} unexpected in all; does modules_to_not_convert match the weights?)")


def read_config(ckpt_dir):
    """(config dict, checked quantization_config dict) of a checkpoint folder."""
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise QuantEaseError(f"{ckpt_dir}: no config.json (not a checkpoint folder)")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise QuantEaseError(f"{path}: not valid JSON ({e})") from None
    qc = check_quant_config(config.get("quantization_config"), f"{path}: quantization_config")
    return config, qc


class Tensors(Mapping):
    """Lazy {name: tensor} over a checkpoint's safetensors files; each access reads one tensor."""

    def __init__(self, files):
        self.files = files
        self._open = {}

    def _handle(self, path):
        from safetensors import safe_open

        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]

    def __getitem__(self, name):
        path = self.files[name]
        try:
            return self._handle(path).get_tensor(name)
        except Exception as e:
            raise QuantEaseError(f"{path}: cannot read tensor '{name}' ({type(e).__name__}: {e})") from None

    def where(self, name):
        return self.files[name]

    def __iter__(self):
        return iter(self.files)

    def __len__(self):
        return len(self.files)


def validate_checkpoint(ckpt_dir, content=True):
    """Check a quantized folder before use: config, every tensor's presence/dtype/shape, and (content=True)
    the values of every quantized layer. Returns (config, qc, quantized {prefix: (N, K)}, Tensors)."""
    config, qc = read_config(ckpt_dir)
    quantized, spec = expected_tensors(meta_model(config), qc)
    files = weight_files(ckpt_dir)
    check_headers(files, spec)
    tensors = Tensors(files)
    if content:
        for prefix, (n, k) in quantized.items():
            layer = {s: tensors[f"{prefix}.{s}"] for s in layout.TENSORS + ("bias",) if f"{prefix}.{s}" in files}
            check_layer_content(prefix, layer, k, layer_config(qc, prefix)["bits"], tensors.where(f"{prefix}.qweight"))
    return config, qc, quantized, tensors


def read_checkpoint(ckpt_dir, validate=True):
    """(config dict, quantization_config dict, lazy {name: tensor}) of a quantized folder."""
    if validate:
        config, qc, _, tensors = validate_checkpoint(ckpt_dir)
        return config, qc, tensors
    config, qc = read_config(ckpt_dir)
    return config, qc, Tensors(weight_files(ckpt_dir))


# ---------------------------------------------------------------- writing

@contextmanager
def atomic_dir(out_dir, overwrite=False):
    """Yield a temporary sibling folder; rename it to out_dir only when the body finishes.

    An exception (or a kill) leaves at most a hidden `.NAME.tmp-*` sibling, never a complete-looking out_dir."""
    out = Path(out_dir)
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        check_target(out, overwrite)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_target(out, overwrite):
    if out.exists() and not overwrite:
        raise QuantEaseError(f"{out} already exists (use overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise QuantEaseError(f"{out} exists and is not a folder")


def write_shards(out_dir, tensors, max_shard_size=DEFAULT_MAX_SHARD_SIZE, metadata=None):
    """{name: tensor} -> model.safetensors, or shards + index above max_shard_size bytes (HF naming)."""
    from safetensors.torch import save_file

    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    metadata = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file({k: tensors[k].contiguous() for k in shards[0]}, str(Path(out_dir) / SINGLE_FILE), metadata)
        return
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in names}, str(Path(out_dir) / fname), metadata)
        weight_map.update(dict.fromkeys(names, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    (Path(out_dir) / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def copy_side_files(source_dir, out_dir):
    """Tokenizer files, chat template and generation config from the source folder."""
    if source_dir is None:
        return
    for p in sorted(Path(source_dir).iterdir()):
        if p.is_file() and p.name.startswith(COPY_PREFIXES):
            shutil.copy2(p, Path(out_dir) / p.name)


def write_config(out_dir, config_dict):
    (Path(out_dir) / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")


def model_config_dict(model):
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    return config


def build_quant_config(model, layers, quant_config):
    """The full quantization_config: the caller's settings checked against every layer, plus what is derived."""
    import quantease

    qc = {"sym": False, "outlier_fraction": 0.0, "structured_outliers": False, "method": "unknown", **quant_config}
    for key in ("bits", "group_size"):
        if key not in qc:
            raise QuantEaseError(f"quant_config needs '{key}'")
    dims = {name: linear_dims(m) for name, m in linears(model).items()}
    for name, qw in layers.items():
        if name not in dims:
            raise QuantEaseError(f"layers has '{name}', which is not a linear layer of the model")
        if qw.shape != dims[name]:
            raise QuantEaseError(f"{name}: quantized shape {list(qw.shape)} != linear [out, in] {list(dims[name])}")
        lc = layer_config(qc, name)
        for key in ("bits", "group_size", "sym"):
            if getattr(qw, key) != lc[key]:
                raise QuantEaseError(f"{name}: {key}={getattr(qw, key)} but quant_config has {key}={lc[key]}")
    for name in qc.get("overrides", {}):
        if name not in layers:
            raise QuantEaseError(f"quant_config overrides '{name}', which is not a quantized layer")
    qc.update(quant_method=QUANT_METHOD, format_version=FORMAT_VERSION,
              modules_to_not_convert=sorted(set(dims) - set(layers)),
              quantease_version=quantease.__version__)
    # not-converted entries also cover subtrees; the layers written must not fall under one
    for name in layers:
        if is_skipped(name, qc["modules_to_not_convert"]):
            raise QuantEaseError(f"{name} is quantized but falls under modules_to_not_convert")
    return check_quant_config(qc, "quant_config")


def untie_config(config):
    """The config with tie_word_embeddings off, at the top and in a nested text config (Gemma 3 style)."""
    config["tie_word_embeddings"] = False
    for sub in config.values():
        if isinstance(sub, dict) and "tie_word_embeddings" in sub:
            sub["tie_word_embeddings"] = False


def json_safe(d):
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}


def write_checkpoint(out_dir, model, layers, *, quant_config, source_dir=None, report=None, overwrite=False,
                     max_shard_size=DEFAULT_MAX_SHARD_SIZE):
    """Write a quantized HF folder atomically.

    model: the transformers model (CPU) still holding dense weights for the quantized linears (skipped);
    layers: {module name: QuantizedWeight}; quant_config: bits, group_size, sym, outlier_fraction,
    structured_outliers, method, ...; report: extra fields for quantease_report.json (sweeps, calibration,
    "layers": {name: {...}})."""
    out = Path(out_dir)
    check_target(out, overwrite)  # fail before any work
    qc = build_quant_config(model, layers, quant_config)
    tied = dict(getattr(model, "all_tied_weights_keys", {}) or {})
    state = model.state_dict()
    for prefix in layers:
        if f"{prefix}.weight" in tied.values():
            raise QuantEaseError(f"{prefix} is tied to another weight and cannot be quantized")
    # a quantized tie target (the lm_head tied to the embeddings) is stored as its own layer: the source stays
    untied = {name for name in tied if name.rpartition(".")[0] in layers}
    tensors, layer_report, bits_sum, weights = {}, {}, 0.0, 0
    for name, t in state.items():
        prefix, _, suffix = name.rpartition(".")
        if name in tied and name not in untied:
            continue
        if prefix in layers:
            if suffix == "weight":
                qw = layers[prefix]
                try:
                    packed = pack_layer(qw, layer_config(qc, prefix)["outlier_fraction"])
                except QuantEaseError as e:
                    raise QuantEaseError(f"{prefix}: {e}") from None
                n, k = qw.shape
                bpw = packed_bits(packed, n, k)
                bits_sum, weights = bits_sum + bpw * n * k, weights + n * k
                layer_report[prefix] = {"bits_per_weight": bpw, "num_outliers": qw.num_outliers, **json_safe(qw.info)}
                tensors.update({f"{prefix}.{s}": v for s, v in packed.items()})
                continue
        tensors[name] = t.detach().to("cpu")
    qc["bits_per_weight"] = bits_sum / weights if weights else None
    config = model_config_dict(model)
    if untied:
        untie_config(config)
    config["quantization_config"] = qc
    full_report = {"quantease_version": qc["quantease_version"], "method": qc["method"],
                   "bits_per_weight": qc["bits_per_weight"], "quantization_config": qc}
    for key, value in (report or {}).items():
        if key == "layers":
            for lname, info in value.items():
                layer_report.setdefault(lname, {}).update(info)
        else:
            full_report[key] = value
    full_report["layers"] = layer_report
    metadata = {"quant_method": QUANT_METHOD, "format_version": str(FORMAT_VERSION),
                "quantease_version": qc["quantease_version"], "method": str(qc["method"]),
                "bits_per_weight": f"{qc['bits_per_weight']}"}
    with atomic_dir(out, overwrite) as tmp:
        write_config(tmp, config)
        write_shards(tmp, tensors, max_shard_size, metadata)
        copy_side_files(source_dir, tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(full_report, indent=2, default=str) + "\n")
    return out


# ---------------------------------------------------------------- dequantize

def dequantized_tensors(ckpt_dir, dtype=torch.float16):
    """(config dict without quantization_config, {name: tensor}) with every quantized linear made dense."""
    config, qc, quantized, tensors = validate_checkpoint(ckpt_dir)
    out = {}
    for name in tensors:
        prefix, _, suffix = name.rpartition(".")
        if prefix not in quantized:
            out[name] = tensors[name]
        elif suffix == "qweight":
            n, k = quantized[prefix]
            lc = layer_config(qc, prefix)
            get = lambda s: tensors[f"{prefix}.{s}"] if f"{prefix}.{s}" in tensors else None  # noqa: E731
            out[f"{prefix}.weight"] = layout.dequantize_packed(
                get("qweight"), get("scales"), get("zeros"), get("outlier_idx"), get("outlier_val"),
                lc["bits"], lc["group_size"], k, dtype=dtype)
        elif suffix == "bias":
            out[name] = tensors[name]
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    return config, out


def add_arguments(p):
    p.add_argument("checkpoint", metavar="DIR", help="quantease checkpoint folder")
    p.add_argument("out", metavar="OUT", help="output folder for the plain fp16 HF checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--max-shard-size", type=float, default=DEFAULT_MAX_SHARD_SIZE / 1024 ** 3,
                   help="GiB per safetensors shard (default %(default)s)")


def run(args):
    out = Path(args.out)
    check_target(out, args.overwrite)
    config, tensors = dequantized_tensors(args.checkpoint)
    with atomic_dir(out, args.overwrite) as tmp:
        write_config(tmp, config)
        write_shards(tmp, tensors, int(math.ceil(args.max_shard_size * 1024 ** 3)))
        copy_side_files(args.checkpoint, tmp)
    print(f"wrote {out} ({len(tensors)} tensors, fp16)")
