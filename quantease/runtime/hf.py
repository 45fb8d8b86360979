"""transformers integration: `AutoModelForCausalLM.from_pretrained(QUANTIZED_DIR)` after `import quantease.runtime`.

A QuantizationConfigMixin + HfQuantizer pair registered under quant_method "quantease" through transformers'
public registration API. Before weights load (model on the meta device) the quantizer checks the safetensors
headers against the config and swaps the quantized nn.Linear modules for QuantEaseLinear placeholders, so the
packed tensors load straight into them and no dense weight is ever built. After loading it checks the values
(NaN scales, outlier indices out of range, ...) and keeps scales/outlier values in fp16.
"""
from pathlib import Path

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from quantease.errors import QuantEaseError
from quantease.format import checkpoint as ckpt
from quantease.format import layout
from quantease.runtime.linear import QuantEaseLinear, replace_linears

# float tensors that must keep their fp16 values: transformers casts float checkpoint tensors to the requested
# dtype, and bf16 would round the scales; these patterns make it load them in fp32 (lossless) instead
KEEP_EXACT = (r"\.scales$", r"\.outlier_val$")


class QuantEaseConfig(QuantizationConfigMixin):
    """quantization_config of a quantease checkpoint; unknown keys (method, bits_per_weight, ...) round-trip."""

    def __init__(self, bits=3, group_size=128, sym=False, outlier_fraction=0.0, structured_outliers=False,
                 modules_to_not_convert=None, format_version=ckpt.FORMAT_VERSION, **kwargs):
        kwargs.pop("quant_method", None)
        self.quant_method = ckpt.QUANT_METHOD
        self.format_version = format_version
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.outlier_fraction, self.structured_outliers = outlier_fraction, structured_outliers
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        for key, value in kwargs.items():
            setattr(self, key, value)
        ckpt.check_quant_config(self.to_dict())


class QuantEaseHfQuantizer(HfQuantizer):
    requires_calibration = True  # loads pre-quantized checkpoints only; quantizing is `quantease quantize`

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.files = {}

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        qc = ckpt.check_quant_config(self.quantization_config.to_dict())
        _, spec = ckpt.expected_tensors(model, qc)
        if checkpoint_files:
            self.files = ckpt.weight_files(Path(checkpoint_files[0]).parent)
            ckpt.check_headers(self.files, spec)
        replace_linears(model, qc)
        model._keep_in_fp32_modules_strict = set(model._keep_in_fp32_modules_strict or ()) | set(KEEP_EXACT)
        skip_init_around_quantized(model)

    def _process_model_after_weight_loading(self, model, **kwargs):
        for m in model.modules():
            m.__dict__.pop("_init_weights", None)  # back to the class's method
        for name, m in model.named_modules():
            if not isinstance(m, QuantEaseLinear):
                continue
            for suffix in ("scales", "outlier_val"):
                t = getattr(m, suffix)
                if t is not None and t.dtype != torch.float16:
                    setattr(m, suffix, t.to(torch.float16))
            tensors = {s: getattr(m, s) for s in layout.TENSORS + ("bias",) if getattr(m, s) is not None}
            if any(t.is_meta for t in tensors.values()):
                raise QuantEaseError(f"{name}: packed tensors were not loaded")
            where = self.files.get(f"{name}.qweight", "checkpoint")
            ckpt.check_layer_content(name, tensors, m.in_features, m.bits, where)
        return model

    @property
    def is_trainable(self):
        return False

    def is_serializable(self):
        # the buffers carry the checkpoint's tensor names, so save_pretrained writes the same format back
        return True


def skip_init_around_quantized(model):
    """Models' _init_weights may reach into a child linear's .weight (GPT-2 re-inits c_proj.weight); a
    QuantEaseLinear has none. Every tensor was checked present in the checkpoint, so there is nothing to init
    in a module holding one: skip those modules (per PreTrainedModel, as each sub-model inits its own)."""
    from transformers import PreTrainedModel

    for sub in model.modules():
        if isinstance(sub, PreTrainedModel):
            sub._init_weights = _skipping(sub._init_weights)


def _skipping(init_weights):
    def init(module):
        if isinstance(module, QuantEaseLinear) or any(isinstance(c, QuantEaseLinear) for c in module.children()):
            return
        init_weights(module)
    return init


def register():
    """Register the config and quantizer with transformers (idempotent)."""
    from transformers.quantizers import auto

    if ckpt.QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(ckpt.QUANT_METHOD)(QuantEaseConfig)
    if ckpt.QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(ckpt.QUANT_METHOD)(QuantEaseHfQuantizer)


def load(ckpt_dir, device="cpu", dtype=torch.float16):
    """A quantized folder as a transformers model on `device`; activations, norms and embeddings in `dtype`."""
    from transformers import AutoModelForCausalLM

    ckpt.read_config(ckpt_dir)  # unknown quant_method / format_version: transformers would ignore them silently
    register()
    model = AutoModelForCausalLM.from_pretrained(str(ckpt_dir), dtype=dtype, device_map=device)
    return model.eval()


register()  # importing this module first is fine too: the registry hook defers to this line
