"""Mixture-of-Routers weights of every layer of a dense Hugging Face model (method.md part 2).

Shape legend: L layers, H query heads, H_kv key/value heads, d_h head dim, d hidden size,
R routers, d_r router dim, K expert keys.
"""
from typing import List, Tuple

import torch

from router_upcycling.init.grouping import head_keys_from_kv, router_weights_from_attention


def query_norm_gain(layer: torch.nn.Module) -> torch.Tensor:
    """A QK-norm layer's query norm weight g_q [d_h], float32 on CPU (a copy: the routers train their own)."""
    return layer.self_attn.q_norm.weight.detach().float().cpu().clone()


def query_weight_of(layer: torch.nn.Module, num_heads: int, fold_query_norm: bool) -> torch.Tensor:
    """A layer's q_proj weight [H * d_h, d], float32 on CPU; with `fold_query_norm` (QK-norm models) each head's rows
    scaled by the query norm's weight g_q [d_h]: diag(g_q) W_q, the norm's linear part (its 1/rms is per token)."""
    q_weight = layer.self_attn.q_proj.weight.detach().float().cpu()
    if not fold_query_norm:
        return q_weight
    gain = query_norm_gain(layer)  # [d_h]
    return (q_weight.view(num_heads, gain.shape[0], -1) * gain[None, :, None]).reshape(q_weight.shape)


def init_routers_from_attention(
    hf_model: torch.nn.Module, avg_kv_keys: torch.Tensor, num_routers: int, num_experts: int,
    fold_query_norm: bool = False,
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(query_weight [R, d_r, d], keys [K, d_r]) of every layer, float32 on CPU.

    Args:
        hf_model: the dense ...ForCausalLM (or its decoder); its q_proj weights are read (the q bias is not used).
        avg_kv_keys: [L, H_kv, d_h] from router_upcycling.init.calibration.average_attention_keys (or [L, H, d_h]:
            one statistic per query head, e.g. its average query).
        num_routers: R.
        num_experts: N.
        fold_query_norm: QK-norm models: take the queries after the norm's weight (query_weight_of).
    """
    layers = getattr(hf_model, "model", hf_model).layers
    num_heads = hf_model.config.num_attention_heads
    # one statistic per KV head (average keys) or per query head (average queries: router init `query`)
    if avg_kv_keys.shape[0] != len(layers) or avg_kv_keys.shape[1] not in (hf_model.config.num_key_value_heads, num_heads):
        raise ValueError(
            f"average keys {tuple(avg_kv_keys.shape)} do not match a model of {len(layers)} layers, "
            f"{hf_model.config.num_key_value_heads} key/value heads and {num_heads} query heads"
        )
    routers = []
    for layer, kv_keys in zip(layers, avg_kv_keys):
        q_weight = query_weight_of(layer, num_heads, fold_query_norm)  # [H * d_h, d]
        head_keys = head_keys_from_kv(kv_keys.float().cpu(), num_heads)  # [H, d_h]
        query_weight, keys, _ = router_weights_from_attention(q_weight, head_keys, num_heads, num_routers, num_experts)
        routers.append((query_weight, keys))
    return routers
