"""Hugging Face <-> megatron-core GPT weights: the family's weight table (router_upcycling.settings.families)
applied with small named transforms.

Placeholders: {layer} (decoder block), {expert} (MoE expert). Megatron names are those of the
local layer spec at TP = PP = EP = 1, i.e. the full tensors of `model.state_dict()`; distributed
checkpoints reshard them for any other parallel layout.

Read left to right for upcycling (HF dense -> megatron MoE, every expert taking the dense FFN);
the export direction applies the inverse transforms.
"""
from typing import Sequence, Tuple

import torch

from router_upcycling.settings.architecture import Architecture
from router_upcycling.settings.families import WeightRule, family_named


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_query_groups: int) -> torch.Tensor:
    """HF q [H*d_h, ...], k, v [G*d_h, ...] -> megatron's linear_qkv [(H + 2G)*d_h, ...], in
    query-group order: for each group g its H/G query heads, then k_g, then v_g."""
    heads_per_group = num_heads // num_query_groups
    head_dim = q.shape[0] // num_heads
    rest = q.shape[1:]
    q = q.reshape(num_query_groups, heads_per_group * head_dim, *rest)
    k = k.reshape(num_query_groups, head_dim, *rest)
    v = v.reshape(num_query_groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_query_groups: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv."""
    heads_per_group = num_heads // num_query_groups
    head_dim = qkv.shape[0] // (num_heads + 2 * num_query_groups)
    rest = qkv.shape[1:]
    grouped = qkv.reshape(num_query_groups, (heads_per_group + 2) * head_dim, *rest)
    q, k, v = grouped.split([heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: megatron's linear_fc1 holds the gate rows, then the up rows."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate, up



def to_mcore(rule: WeightRule, tensors: Sequence[torch.Tensor], arch: Architecture) -> torch.Tensor:
    if rule.transform == "qkv":
        return fuse_qkv(*tensors, num_heads=arch.num_heads, num_query_groups=arch.num_kv_heads)
    if rule.transform == "gate_up":
        return fuse_gate_up(*tensors)
    (tensor,) = tensors
    return tensor


def to_hf(rule: WeightRule, tensor: torch.Tensor, arch: Architecture) -> Tuple[torch.Tensor, ...]:
    if rule.transform == "qkv":
        return split_qkv(tensor, arch.num_heads, arch.num_kv_heads)
    if rule.transform == "gate_up":
        return split_gate_up(tensor)
    return (tensor,)


def expand(template: str, layer: int = None, expert: int = None) -> str:
    return template.format(layer=layer, expert=expert)


def _layers(rule: WeightRule, arch: Architecture):
    return range(arch.num_layers) if rule.per_layer else [None]


def map_dense_to_mcore(hf_tensors: dict, arch: Architecture) -> Tuple[dict, dict]:
    """Apply the family's table to the dense HF tensors.

    Returns (mcore tensors of the non-expert parameters, per-layer FFN tensors
    {layer: {expert rule mcore template: tensor}}) -- the FFN tensors are made once per layer and
    shared by every expert, so N experts cost one copy in memory.
    """
    family = family_named(arch.family)
    shared, ffn = {}, {}
    for rule in family.weight_rules(arch):
        for layer in _layers(rule, arch):
            shared[expand(rule.mcore, layer)] = to_mcore(rule, [hf_tensors[expand(n, layer)] for n in rule.hf], arch)
    for layer in range(arch.num_layers):
        ffn[layer] = {
            rule.mcore: to_mcore(rule, [hf_tensors[expand(n, layer)] for n in rule.hf], arch) for rule in family.expert_rules
        }
    return shared, ffn


ROUTER_MCORE = "decoder.layers.{layer}.mlp.router."
ROUTER_HF = "model.layers.{layer}.mlp.gate."
# the `mor` format's fused experts: [N, 2I, d] (fc1 is the gate rows, then the up rows) and [N, d, I]
MOR_EXPERTS = ("model.layers.{layer}.mlp.experts.gate_up_proj", "model.layers.{layer}.mlp.experts.down_proj")


def map_mcore_to_mor(mcore_tensors: dict, arch: Architecture, num_experts: int) -> dict:
    """Full megatron tensors (TP = PP = EP = 1 names) -> the `mor` HF naming of docs/checkpoint-format.md.

    The dense table is applied backwards; each layer's experts are stacked into the fused
    `gate_up_proj` / `down_proj`; router parameters keep their names under `mlp.gate.`.
    """
    family = family_named(arch.family)
    hf = {}
    for rule in family.weight_rules(arch):
        for layer in _layers(rule, arch):
            parts = to_hf(rule, mcore_tensors[expand(rule.mcore, layer)], arch)
            hf.update({expand(name, layer): part.contiguous() for name, part in zip(rule.hf, parts)})
    for layer in range(arch.num_layers):
        for rule, hf_name in zip(family.expert_rules, MOR_EXPERTS):
            hf[expand(hf_name, layer)] = torch.stack([mcore_tensors[expand(rule.mcore, layer, e)] for e in range(num_experts)])
        router_prefix = expand(ROUTER_MCORE, layer)
        for name, tensor in mcore_tensors.items():
            if name.startswith(router_prefix):
                hf[expand(ROUTER_HF, layer) + name[len(router_prefix):]] = tensor
    return hf
