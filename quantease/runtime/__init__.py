"""Runtimes for quantease checkpoints: transformers (here) and vLLM (runtime.vllm_plugin).

Importing this package makes `AutoModelForCausalLM.from_pretrained(QUANTIZED_DIR)` work, without importing
transformers or torch itself: the quantizer is registered the moment transformers' quantizer registry module
is imported (or right now, if it already was). That keeps `import quantease` fast.
"""
import importlib.abc
import sys

REGISTRY = "transformers.quantizers.auto"


def register():
    hf = sys.modules.get("quantease.runtime.hf")
    if hf is not None and not hasattr(hf, "load"):
        return  # hf.py is being imported right now (it imports the registry); it registers at its end
    from quantease.runtime.hf import register as hf_register

    hf_register()


def load(ckpt_dir, device="cpu", dtype=None):
    """A quantized folder as a transformers model (dtype defaults to torch.float16)."""
    import torch

    from quantease.runtime.hf import load as hf_load

    return hf_load(ckpt_dir, device=device, dtype=torch.float16 if dtype is None else dtype)


def is_quantized(model_dir):
    """True when model_dir's config.json says quant_method "quantease" (cheap: reads the JSON only)."""
    import json
    from pathlib import Path

    try:
        qc = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "quantease"


def __getattr__(name):  # QuantEaseLinear without importing torch at package import
    if name == "QuantEaseLinear":
        from quantease.runtime.linear import QuantEaseLinear

        return QuantEaseLinear
    raise AttributeError(name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds transformers' quantizer registry through the other finders and registers right after it executes."""

    def find_spec(self, name, path, target=None):
        if name != REGISTRY:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        loader = spec.loader

        def exec_and_register(module):
            del loader.exec_module  # the loader's own method again (the loader may be shared)
            loader.exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            register()

        loader.exec_module = exec_and_register
        return spec


if REGISTRY in sys.modules:
    register()
elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnImport())
