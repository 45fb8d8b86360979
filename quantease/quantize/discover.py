"""Find what to quantize in any Hugging Face decoder: the stack of transformer blocks and their linears.

No per-family code: the block stack is the nn.ModuleList of same-class modules holding the most
parameters (so a vision tower or a small adapter list loses to the text decoder), and a block's
quantizable layers are its nn.Linear and transformers Conv1D (GPT-2: weight stored transposed,
[in, out]) modules.  Embeddings, the final norm and lm_head live outside the stack and stay as they are
(the lm_head is quantized only on request: pipeline's --lm-head).
Tested on Llama, Qwen2, Mistral, Gemma 3 (text), OPT and GPT-2.
"""
import torch
from torch import nn

from quantease.errors import QuantEaseError

TESTED = "Llama, Qwen2, Mistral, Gemma 3 (text), OPT, GPT-2"

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always has it today
    Conv1D = ()


def is_linear(module):
    return isinstance(module, nn.Linear) or (Conv1D and isinstance(module, Conv1D))


def is_conv1d(module):
    return bool(Conv1D) and isinstance(module, Conv1D)


def _num_params(module):
    return sum(p.numel() for p in module.parameters())


def find_blocks(model):
    """(dotted name, nn.ModuleList) of the transformer block stack."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(b) for b in module}) != 1:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        size = _num_params(module)
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise QuantEaseError(
            f"no stack of transformer blocks (an nn.ModuleList of identical blocks with linear layers) "
            f"found in {type(model).__name__}; supported: Hugging Face decoder-only causal LMs "
            f"(tested: {TESTED})")
    return best


def find_linears(block):
    """{name inside the block: module} for every nn.Linear / Conv1D in it, in definition order."""
    return {name: m for name, m in block.named_modules() if is_linear(m)}


def get_weight(module):
    """Weight as [out, in] (the QuantizedWeight orientation), whatever the module stores."""
    w = module.weight.data
    return w.t() if is_conv1d(module) else w


def set_weight(module, w):
    """Write an [out, in] weight back in the module's own orientation and dtype."""
    if is_conv1d(module):
        w = w.t()
    module.weight.data.copy_(w.to(module.weight.dtype))


def linear_groups(block, run_block):
    """The block's linears grouped by shared input, in execution order.

    run_block() runs one forward of the block; linears that receive the very same input tensor
    (q/k/v; gate/up) form one group, so one Σ serves the group and groups are the dependency order
    used by true-sequential quantization: [[q, k, v], [o], [gate, up], [down]] for Llama.
    Linears the forward never calls are left out (they get no calibration data)."""
    linears = find_linears(block)
    seen = []  # (input tensor, [names]) in call order
    hooks = []

    def hook(name):
        def record(module, args):
            x = args[0]
            for tensor, names in seen:
                if tensor is x:
                    names.append(name)
                    return
            seen.append((x, [name]))
        return record

    for name, m in linears.items():
        hooks.append(m.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            run_block()
    finally:
        for h in hooks:
            h.remove()
    groups, done = [], set()
    for _, names in seen:
        names = [n for n in names if n not in done]  # a linear called twice counts once, first call
        done.update(names)
        if names:
            groups.append(names)
    return groups
