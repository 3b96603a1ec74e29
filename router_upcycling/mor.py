"""Router math, pure torch: Router Upcycling's Mixture-of-Routers scoring, and LocMoE's GrAP gate.

This file is the math's one home. The megatron-core routers, the converter and the exported
Hugging Face model all call it; an exported `mor` folder carries a verbatim copy of this file
beside its modeling file, so it must import nothing but torch.

Shape legend
    T  tokens                 d   hidden size (router input)
    R  routers per layer      d_r router dim (= H * d_h / R)
    K  expert keys per layer  N   experts per layer, K = max(R, N), N divides K
    g  GrAP group size, d / N     d_h attention head dim

Key-to-expert map: expert i holds keys {i, i + N, i + 2N, ...} (K / N keys each). With R >= N
these are router keys {i, i+N, ...}; with R < N there are N keys, key j initialised from
router j mod R (see router_upcycling.init), so every expert holds exactly one key.

Which settings fit which models (router, expert and head counts) is not the math's concern: the
router registry (router_upcycling.settings.routers) holds those rules; the functions here only
refuse shapes they cannot compute.
"""
from typing import Optional

import torch


def expert_key_indices(num_experts: int, num_keys: int) -> torch.Tensor:
    """Indices of the keys each expert holds: LongTensor [N, K / N], row i = {i, i+N, ...}."""
    if num_keys % num_experts:
        raise ValueError(f"the number of keys ({num_keys}) must be a multiple of the number of experts ({num_experts})")
    return torch.arange(num_keys).view(num_keys // num_experts, num_experts).t().contiguous()


def head_rms_norm(queries: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Each attention head's RMS norm, as a QK-norm model's attention applies it to its queries (Qwen3's q_norm).

    Args:
        queries: [..., d_r], d_r a multiple of d_h: the router's query, its heads side by side.
        weight: g_q, the norm's weight [d_h] (one for every head).
        eps: the norm's epsilon.

    Returns:
        [..., d_r]: every d_h-wide head scaled to unit RMS, then by g_q.
    """
    heads = queries.unflatten(-1, (-1, weight.shape[0]))  # [..., d_r / d_h, d_h]
    return (heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + eps) * weight).flatten(-2)


def key_scores(x: torch.Tensor, query_weight: torch.Tensor, keys: torch.Tensor, aggregation: str = "sum",
               query_norm_weight: Optional[torch.Tensor] = None, query_norm_eps: float = 1e-6) -> torch.Tensor:
    """Score of every key, aggregated over routers.

    Args:
        x: router input [T, d].
        query_weight: W, the routers' query projections [R, d_r, d].
        keys: k, the expert keys [K, d_r].
        aggregation: "sum" (s_j = sum_r q_r . k_j) or "max" (s_j = max_r q_r . k_j).
        query_norm_weight: g_q [d_h] to normalise every head of each query q_r = W_r x as the attention does
            (head_rms_norm; d_r a multiple of d_h), or None for the plain projections.
        query_norm_eps: that norm's epsilon.

    Returns:
        s [T, K].
    """
    if aggregation not in ("sum", "max"):
        raise ValueError(f"unknown router aggregation {aggregation!r}; expected 'sum' or 'max'")
    if aggregation == "sum" and query_norm_weight is None:
        # sum_r (W_r x) . k_j = x . (k_j @ sum_r W_r): one [K, d] gate instead of R queries per token.
        return x @ (keys @ query_weight.sum(0)).t()
    num_routers, router_dim, hidden = query_weight.shape
    queries = (x @ query_weight.reshape(num_routers * router_dim, hidden).t()).view(-1, num_routers, router_dim)
    if query_norm_weight is not None:
        queries = head_rms_norm(queries, query_norm_weight, query_norm_eps)
    scores = queries @ keys.t()  # [T, R, K]
    return scores.sum(dim=1) if aggregation == "sum" else scores.amax(dim=1)


def mor_expert_logits(
    x: torch.Tensor,
    query_weight: torch.Tensor,
    keys: torch.Tensor,
    num_experts: int,
    aggregation: str = "sum",
    scale: float = 1.0,
    query_norm_weight: Optional[torch.Tensor] = None,
    query_norm_eps: float = 1e-6,
) -> torch.Tensor:
    """Expert logits of the Mixture-of-Routers: z_i = scale * max over expert i's keys of s_j.

    Args:
        x: router input [T, d].
        query_weight: [R, d_r, d].
        keys: [K, d_r], K a multiple of num_experts.
        num_experts: N.
        aggregation: "sum" or "max" over routers.
        scale: multiplies the logits (1.0, no scaling, is the method's default).
        query_norm_weight, query_norm_eps: the queries' per-head norm (key_scores), or None.

    Returns:
        z [T, N].
    """
    scores = key_scores(x, query_weight, keys, aggregation, query_norm_weight, query_norm_eps)  # [T, K]
    num_keys = keys.shape[0]
    if num_keys != num_experts:
        # key j belongs to expert j mod N: view [T, K/N, N] and take the best key per expert
        scores = scores.view(-1, num_keys // num_experts, num_experts).amax(dim=1)
    return scores * scale if scale != 1.0 else scores


def fold_to_linear_gate(query_weight: torch.Tensor, keys: torch.Tensor, num_experts: int, aggregation: str = "sum", scale: float = 1.0) -> torch.Tensor:
    """The linear gate G = scale * K @ sum_r W_r that computes the same logits, [N, d].

    Only `sum` aggregation with one key per expert is linear in the input (max over routers or over an
    expert's keys is not).

    Args:
        query_weight: [R, d_r, d].
        keys: [N, d_r] (one key per expert).
    """
    if aggregation != "sum" or keys.shape[0] != num_experts:
        raise ValueError(f"a Mixture-of-Routers with {aggregation!r} aggregation and {keys.shape[0]} keys for "
                         f"{num_experts} experts has no linear-gate form")
    gate = keys @ query_weight.sum(0)
    return gate * scale if scale != 1.0 else gate


# ---------------------------------------------------------------- LocMoE (arXiv 2401.13920)

def grap_expert_logits(x: torch.Tensor, num_experts: int) -> torch.Tensor:
    """LocMoE's GrAP gate (section 3.2, Eq. 4): z_i = ReLU(mean of channel group i), no parameters.

    The router input's d channels are cut into N contiguous groups of g = d / N channels; group i is
    channels i*g ... (i+1)*g - 1. The paper's epsilon is never defined and is left out.

    Args:
        x: router input [T, d], d a multiple of num_experts.
        num_experts: N.

    Returns:
        z [T, N].
    """
    if x.shape[-1] % num_experts:
        raise ValueError(f"the GrAP gate cannot cut {x.shape[-1]} channels into {num_experts} equal groups")
    return torch.relu(x.view(x.shape[0], num_experts, -1).mean(-1))  # [T, N, g] -> [T, N]


def routing_distribution(logits: torch.Tensor) -> torch.Tensor:
    """Each token's routing distribution over all N experts (not only its top-k): softmax of the logits.

    Args:
        logits: z [T, N].

    Returns:
        p [T, N], in float32 or the logits' dtype when that is wider.
    """
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


def locality_loss(mean_probs: torch.Tensor) -> torch.Tensor:
    """KL(mean routing distribution || uniform): the project's reading of LocMoE's locality loss with data
    parallelism only (every expert is local, so the paper's local-routing target is uniform over all experts).

    loss = sum_i p_i log(N p_i), 0 when p is uniform, log N when every token goes to one expert.

    Args:
        mean_probs: p [N], the mean over tokens of `routing_distribution`.

    Returns:
        scalar.
    """
    return torch.xlogy(mean_probs, mean_probs * mean_probs.shape[-1]).sum()
