"""vLLM general plugin (entry point `vllm.general_plugins: quantease`): registers the "quantease" method.

vLLM calls register() in every process it starts (API server, engine core, workers), so it must be cheap and
idempotent. After it, `vllm serve QUANTIZED_DIR` needs no flag: config.json's quant_method selects the method.
"""


def register():
    from vllm.model_executor.layers import linear
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    from quantease.runtime.vllm_method import NAME, QuantEaseConfig, QuantEaseLinearMethod

    if NAME not in QUANTIZATION_METHODS:
        register_quantization_config(NAME)(QuantEaseConfig)
    # our parameters carry their own shard logic (vLLM parameters), so take the v2 loader path
    if QuantEaseLinearMethod.__name__ not in linear.WEIGHT_LOADER_V2_SUPPORTED:
        linear.WEIGHT_LOADER_V2_SUPPORTED.append(QuantEaseLinearMethod.__name__)
