"""The one Hugging Face Qwen2 <-> megatron-core GPT weight table, with small named transforms.

Placeholders: {layer} (decoder block), {expert} (MoE expert). Megatron names are those of the
local layer spec at TP = PP = EP = 1, i.e. the full tensors of `model.state_dict()`; distributed
checkpoints reshard them for any other parallel layout.

Read left to right for upcycling (HF dense -> megatron MoE, every expert taking the dense FFN);
the export direction applies the inverse transforms.
"""
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch


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


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: Sequence[str]
    kind: str = "copy"  # copy | qkv | gate_up


DENSE_RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Rule("decoder.layers.{layer}.input_layernorm.weight", ("model.layers.{layer}.input_layernorm.weight",)),
    Rule(
        "decoder.layers.{layer}.self_attention.linear_qkv.weight",
        tuple(f"model.layers.{{layer}}.self_attn.{p}_proj.weight" for p in "qkv"),
        "qkv",
    ),
    Rule(
        "decoder.layers.{layer}.self_attention.linear_qkv.bias",
        tuple(f"model.layers.{{layer}}.self_attn.{p}_proj.bias" for p in "qkv"),
        "qkv",
    ),
    Rule("decoder.layers.{layer}.self_attention.linear_proj.weight", ("model.layers.{layer}.self_attn.o_proj.weight",)),
    Rule("decoder.layers.{layer}.pre_mlp_layernorm.weight", ("model.layers.{layer}.post_attention_layernorm.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",)),
)
EXPERT_RULES = (
    Rule(
        "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight",
        ("model.layers.{layer}.mlp.gate_proj.weight", "model.layers.{layer}.mlp.up_proj.weight"),
        "gate_up",
    ),
    Rule("decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc2.weight", ("model.layers.{layer}.mlp.down_proj.weight",)),
)


def to_mcore(rule: Rule, tensors: Sequence[torch.Tensor], num_heads: int, num_query_groups: int) -> torch.Tensor:
    if rule.kind == "qkv":
        return fuse_qkv(*tensors, num_heads=num_heads, num_query_groups=num_query_groups)
    if rule.kind == "gate_up":
        return fuse_gate_up(*tensors)
    (tensor,) = tensors
    return tensor


def to_hf(rule: Rule, tensor: torch.Tensor, num_heads: int, num_query_groups: int) -> Tuple[torch.Tensor, ...]:
    if rule.kind == "qkv":
        return split_qkv(tensor, num_heads, num_query_groups)
    if rule.kind == "gate_up":
        return split_gate_up(tensor)
    return (tensor,)


def expand(template: str, layer: int = None, expert: int = None) -> str:
    return template.format(layer=layer, expert=expert)


def rules_for(tied_embeddings: bool) -> Tuple[Rule, ...]:
    return tuple(r for r in DENSE_RULES if not (tied_embeddings and r.mcore == "output_layer.weight"))


def is_per_layer(rule: Rule) -> bool:
    return "{layer}" in rule.mcore


def dense_tensor_names(num_layers: int, tied_embeddings: bool) -> list:
    """Every tensor name a dense Qwen2 checkpoint must hold for the table above."""
    names = []
    for rule in rules_for(tied_embeddings) + EXPERT_RULES:
        layers = range(num_layers) if is_per_layer(rule) else [None]
        names += [expand(name, layer) for layer in layers for name in rule.hf]
    return sorted(set(names))


def map_dense_to_mcore(
    hf_tensors: dict, num_layers: int, num_heads: int, num_query_groups: int, tied_embeddings: bool
) -> Tuple[dict, dict]:
    """Apply the table to the dense HF tensors.

    Returns (mcore tensors of the non-expert parameters, per-layer FFN tensors
    {layer: {expert rule mcore template: tensor}}) -- the FFN tensors are made once per layer and
    shared by every expert, so N experts cost one copy in memory.
    """
    shared, ffn = {}, {}
    for rule in rules_for(tied_embeddings):
        layers = range(num_layers) if is_per_layer(rule) else [None]
        for layer in layers:
            sources = [hf_tensors[expand(n, layer)] for n in rule.hf]
            shared[expand(rule.mcore, layer)] = to_mcore(rule, sources, num_heads, num_query_groups)
    for layer in range(num_layers):
        ffn[layer] = {
            rule.mcore: to_mcore(rule, [hf_tensors[expand(n, layer)] for n in rule.hf], num_heads, num_query_groups)
            for rule in EXPERT_RULES
        }
    return shared, ffn


ROUTER_MCORE = "decoder.layers.{layer}.mlp.router."
ROUTER_HF = "model.layers.{layer}.mlp.gate."
EXPERTS_HF = {
    EXPERT_RULES[0].mcore: "model.layers.{layer}.mlp.experts.gate_up_proj",  # [N, 2I, d]: fc1 is gate rows, then up rows
    EXPERT_RULES[1].mcore: "model.layers.{layer}.mlp.experts.down_proj",  # [N, d, I]
}


def map_mcore_to_mor(
    mcore_tensors: dict, num_layers: int, num_experts: int, num_heads: int, num_query_groups: int, tied_embeddings: bool
) -> dict:
    """Full megatron tensors (TP = PP = EP = 1 names) -> the `mor` HF naming of docs/checkpoint-format.md.

    The dense table is applied backwards; each layer's experts are stacked into the fused
    `gate_up_proj` / `down_proj`; router parameters keep their names under `mlp.gate.`.
    """
    hf = {}
    for rule in rules_for(tied_embeddings):
        layers = range(num_layers) if is_per_layer(rule) else [None]
        for layer in layers:
            parts = to_hf(rule, mcore_tensors[expand(rule.mcore, layer)], num_heads, num_query_groups)
            hf.update({expand(name, layer): part.contiguous() for name, part in zip(rule.hf, parts)})
    for layer in range(num_layers):
        for template, hf_name in EXPERTS_HF.items():
            hf[expand(hf_name, layer)] = torch.stack([mcore_tensors[expand(template, layer, e)] for e in range(num_experts)])
        router_prefix = expand(ROUTER_MCORE, layer)
        for name, tensor in mcore_tensors.items():
            if name.startswith(router_prefix):
                hf[expand(ROUTER_HF, layer) + name[len(router_prefix):]] = tensor
    return hf
