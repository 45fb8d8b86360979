"""quantease: 3-bit post-training quantization by coordinate descent, with sparse fp16 outliers."""
__version__ = "0.1.0"
