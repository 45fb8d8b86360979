"""quantease: 3-bit post-training quantization by coordinate descent, with sparse fp16 outliers."""
__version__ = "0.1.0"

# Registers quant_method "quantease" with transformers as soon as transformers loads (imports neither here):
# without it, from_pretrained on a quantized folder would silently ignore the unknown method.
import quantease.runtime  # noqa: E402,F401
