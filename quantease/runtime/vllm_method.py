"""The "quantease" quantization method for vLLM: a QuantizationConfig and its LinearMethod.

Selected by config.json's quantization_config.quant_method == "quantease" once the plugin has registered it
(quantease/runtime/vllm_plugin.py). Parameters load the checkpoint layout (quantease/format/layout.py) as
stored; after loading, quantease.kernels.prepare_weights repacks them once for the kernels, and every forward
calls quantease.kernels.qlinear_prepared (a torch custom op: opaque to torch.compile, safe in CUDA graphs; the
torch reference on CPU, Triton on CUDA). No matmul math here. Kept to the API that vLLM 0.24 .. 0.32 share
(QuantizationConfig, LinearMethodBase, vLLM parameters + weight_loader_v2).

Sharding (tensor parallel):
  column-parallel (q/k/v, gate/up; output dim split): every tensor is sliced along N, like any weight.
  row-parallel (o/down; input dim split): qweight is a contiguous word slice (a 32-column run = `bits` words);
    scales/zeros slice their group columns (group boundaries must fall on the shard boundary); outlier slots
    are loaded whole and filtered to the rank's columns after loading (layout.slice_outliers needs idx and val
    together).
"""
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
)

from quantease.errors import QuantEaseError
from quantease.format import checkpoint as ckpt
from quantease.format import layout
from quantease.kernels import prepare_weights, qlinear_prepared

NAME = ckpt.QUANT_METHOD
PREPARED = ("plane0", "plane1", "scales", "zeros", "outlier_idx", "outlier_val", "words")


def _matches(prefix, module):
    return prefix == module or prefix.endswith("." + module) or prefix.startswith(module + ".")


class QuantEaseConfig(QuantizationConfig):
    def __init__(self, bits, group_size, sym, outlier_fraction, structured_outliers=False,
                 modules_to_not_convert=(), overrides=None):
        super().__init__()
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.outlier_fraction = outlier_fraction
        self.structured_outliers = structured_outliers
        self.modules_to_not_convert = list(modules_to_not_convert)
        self.overrides = dict(overrides or {})  # {checkpoint module name: grid keys}, e.g. a 4-bit lm_head
        self.quantized_prefixes = None  # set of checkpoint prefixes holding a .qweight, when the folder is local

    def __repr__(self):
        return (f"QuantEaseConfig(bits={self.bits}, group_size={self.group_size}, sym={self.sym}, "
                f"outlier_fraction={self.outlier_fraction})")

    @classmethod
    def get_name(cls):
        return NAME

    @classmethod
    def get_supported_act_dtypes(cls):
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls):
        return 70

    @staticmethod
    def get_config_filenames():
        return []  # the config lives in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]):
        qc = ckpt.check_quant_config(config)
        return cls(bits=qc["bits"], group_size=qc["group_size"], sym=qc["sym"],
                   outlier_fraction=float(qc["outlier_fraction"]),
                   structured_outliers=bool(qc.get("structured_outliers", False)),
                   modules_to_not_convert=qc["modules_to_not_convert"], overrides=qc.get("overrides"))

    def maybe_update_config(self, model_name, hf_config=None, revision=None):
        # Which linears are really quantized is read off the checkpoint's tensor names (headers only), so a
        # layer the quantizer left dense loads as a plain linear whatever modules_to_not_convert says.
        if Path(str(model_name)).is_dir():
            names = ckpt.weight_files(model_name)
            self.quantized_prefixes = {n[: -len(".qweight")] for n in names if n.endswith(".qweight")}

    def apply_vllm_mapper(self, hf_to_vllm_mapper):
        self.modules_to_not_convert = hf_to_vllm_mapper.apply_list(self.modules_to_not_convert)
        self.overrides = {hf_to_vllm_mapper.apply_list([k])[0]: v for k, v in self.overrides.items()}
        if self.quantized_prefixes is not None:
            self.quantized_prefixes = set(hf_to_vllm_mapper.apply_list(sorted(self.quantized_prefixes)))

    def _shard_prefixes(self, prefix):
        """vLLM fuses q/k/v and gate/up: expand the fused prefix back to the checkpoint's layer names."""
        head, _, last = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(last)
        if not shards:
            return [prefix]
        return [f"{head}.{s}" if head else s for s in shards]

    def is_quantized(self, prefix):
        shards = self._shard_prefixes(prefix)
        flags = [not any(_matches(p, m) for m in self.modules_to_not_convert)
                 and (self.quantized_prefixes is None or p in self.quantized_prefixes) for p in shards]
        if any(flags) and not all(flags):
            raise QuantEaseError(f"{prefix}: vLLM fuses {', '.join(shards)} but only some of them are quantized; "
                                 "quantize all of them or none")
        return all(flags)

    def grid(self, prefix):
        """bits, group_size, sym, outlier_fraction of the layer at prefix (its shards' overrides must agree)."""
        base = dict(bits=self.bits, group_size=self.group_size, sym=self.sym, outlier_fraction=self.outlier_fraction)
        grids = [{**base, **self.overrides.get(p, {})} for p in self._shard_prefixes(prefix)]
        if any(g != grids[0] for g in grids):
            raise QuantEaseError(f"{prefix}: vLLM fuses {', '.join(self._shard_prefixes(prefix))} but their "
                                 "quantization grids differ (overrides); give them the same grid")
        return SimpleNamespace(**grids[0])

    def get_quant_method(self, layer, prefix):
        # the lm_head is quantized only when the checkpoint says so (quantease quantize --lm-head BITS)
        head = isinstance(layer, ParallelLMHead)
        if not (isinstance(layer, LinearBase) or head):
            return None  # embeddings: unquantized
        if not self.is_quantized(prefix):
            return None if head else UnquantizedLinearMethod()
        return QuantEaseLinearMethod(self, self.grid(prefix))


class OutlierParameter(ChannelQuantScaleParameter):
    """[N, R] outlier slots: sliced along N like a weight; a row-parallel shard loads all R slots of its rows
    (filtered to its columns in process_weights_after_loading)."""


class QuantEaseLinearMethod(LinearMethodBase):
    """One quantized linear (or the lm_head, a ParallelLMHead: vLLM creates and applies it the same way)."""

    def __init__(self, quant_config: QuantEaseConfig, grid=None):
        self.quant_config = quant_config
        self.grid = grid or quant_config.grid("")

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        qc = self.grid
        loader = extra_weight_attrs["weight_loader"]
        n = sum(output_partition_sizes)
        k, k_full = input_size_per_partition, input_size
        row_split = k != k_full
        prefix = getattr(layer, "prefix", "")
        if row_split and k % layout.RUN:
            raise QuantEaseError(f"{prefix}: the input shard ({k} of {k_full} columns) is not a multiple of "
                                 f"{layout.RUN}; use a smaller tensor-parallel size")
        grouped = qc.group_size != -1
        if row_split and grouped and k % qc.group_size:
            raise QuantEaseError(f"{prefix}: the input shard ({k} of {k_full} columns) does not end on a "
                                 f"group boundary (group_size={qc.group_size}); use a smaller tensor-parallel size")

        def grid(dtype):
            # per-group grids shard with the input; per-channel grids (G=1) are repeated on every rank
            if grouped:
                return GroupQuantScaleParameter(data=torch.empty(n, layout.num_groups(k, qc.group_size), dtype=dtype),
                                                output_dim=0, input_dim=1, weight_loader=loader)
            return ChannelQuantScaleParameter(data=torch.empty(n, 1, dtype=dtype), output_dim=0, weight_loader=loader)

        words = layout.padded_k(k) // layout.RUN * qc.bits
        layer.register_parameter("qweight", ModelWeightParameter(
            data=torch.empty(n, words, dtype=torch.int32), output_dim=0, input_dim=1, weight_loader=loader))
        layer.register_parameter("scales", grid(torch.float16))
        layer.register_parameter("zeros", None if qc.sym else grid(torch.uint8))
        r = layout.outlier_slots(k_full, qc.outlier_fraction)
        has_outliers = r > 0
        layer.register_parameter("outlier_idx", OutlierParameter(
            data=torch.empty(n, r, dtype=layout.index_dtype(k_full)), output_dim=0, weight_loader=loader)
            if has_outliers else None)
        layer.register_parameter("outlier_val", OutlierParameter(
            data=torch.empty(n, r, dtype=torch.float16), output_dim=0, weight_loader=loader)
            if has_outliers else None)
        layer.qe_in_features = k
        # first input column of this rank, for the outlier slots of row-parallel shards (None: not split)
        layer.qe_col_start = _tp_rank(layer) * k if row_split else None

    def process_weights_after_loading(self, layer):
        qc = self.grid
        idx = None if layer.outlier_idx is None else layer.outlier_idx.data
        val = None if layer.outlier_val is None else layer.outlier_val.data
        if idx is not None and layer.qe_col_start is not None:
            # row-parallel shard: keep this rank's columns, re-based (needs idx and val together)
            start = layer.qe_col_start
            idx, val = layout.slice_outliers(idx, val, start, start + layer.qe_in_features)
        p = prepare_weights(layer.qweight.data, layer.scales.data, None if layer.zeros is None else layer.zeros.data,
                            idx, val, qc.bits, qc.group_size, layer.qe_in_features)
        # from here on plain Parameters in the kernels' layout (loading is over; shapes may change)
        del layer.qweight
        for name in PREPARED:
            t = p.get(name)
            layer.register_parameter(name, None if t is None else torch.nn.Parameter(t, requires_grad=False))
        layer.qe_out_features = p["out_features"]

    def apply(self, layer, x, bias=None):
        qc = self.grid
        p = {name: getattr(layer, name) for name in PREPARED}
        p.update(bits=qc.bits, group_size=qc.group_size, in_features=layer.qe_in_features,
                 out_features=layer.qe_out_features)
        return qlinear_prepared(x, p, bias)


def _tp_rank(layer):
    if hasattr(layer, "tp_rank"):
        return layer.tp_rank
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()
