"""Find a model's MoE layers and watch their routers through forward hooks: no model-specific code.

Contract (docs/checkpoint-format.md): every MoE decoder layer has `mlp.gate(hidden [T, d])`
returning `(router_logits [T, N], top_k_weights [T, k], top_k_index [T, k])` and `mlp.experts`
with fused `gate_up_proj` [N, 2I, d], `down_proj` [N, d, I] and `act_fn`. Stock transformers
Qwen2-MoE and our `mor` export both satisfy it.
"""
import re
from contextlib import contextmanager
from typing import Callable, Dict, Iterator

import torch

from router_upcycling.analyze.inputs import AnalysisError

_MLP_NAME = re.compile(r"layers\.(\d+)\.mlp$")

# callback(layer, hidden [T, d], router_logits [T, N], top_k_weights [T, k], top_k_index [T, k])
GateCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def moe_layers(model: torch.nn.Module) -> Dict[int, torch.nn.Module]:
    """{decoder layer index: its MoE block (the module holding `gate` and `experts`)}, ascending."""
    layers = {}
    for name, module in model.named_modules():
        match = _MLP_NAME.search(name)
        if match and hasattr(module, "gate") and hasattr(module, "experts"):
            layers[int(match.group(1))] = module
    if not layers:
        raise AnalysisError("the model has no MoE layers (no `layers.N.mlp` with `gate` and `experts`); is it a dense model?")
    return dict(sorted(layers.items()))


@contextmanager
def watch_gates(model: torch.nn.Module, callback: GateCallback, layers=None) -> Iterator[None]:
    """Call `callback` after every router call of the given MoE layers (default: all) while inside the block."""
    blocks = moe_layers(model)
    handles = []
    for layer in blocks if layers is None else layers:

        def hook(module, args, output, layer=layer):
            logits, top_k_weights, top_k_index = output
            callback(layer, args[0], logits, top_k_weights, top_k_index)

        handles.append(blocks[layer].gate.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
