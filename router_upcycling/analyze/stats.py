"""The analyses' arithmetic on one batch of router calls, pure torch, float32.

Shape legend
    T  tokens   d  hidden size   N  experts   k  experts per token   I  expert FFN size
"""
import torch


def dense_routing_weights(top_k_weights: torch.Tensor, top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routing weight of every expert for every token, zero for experts not chosen: [T, k] x2 -> [T, N]."""
    weights = torch.zeros(top_k_index.shape[0], num_experts, dtype=torch.float32, device=top_k_index.device)
    return weights.scatter_add_(1, top_k_index, top_k_weights.float())


def routing_map_of(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Which experts each token was routed to: [T, k] -> [T, N] bool (the megatron-core router's routing_map)."""
    routing_map = torch.zeros(top_k_index.shape[0], num_experts, dtype=torch.bool, device=top_k_index.device)
    return routing_map.scatter_(1, top_k_index, True)


def expert_token_counts(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many of the T * k routing slots went to each expert: [T, k] -> [N] (float)."""
    return torch.bincount(top_k_index.reshape(-1), minlength=num_experts).float()


def expert_outputs(experts: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Every expert applied to every token, weights not applied: hidden [T, d] -> [N, T, d].

    Uses the fused SwiGLU parameters: gate_up_proj [N, 2I, d] (gate rows, then up rows), down_proj [N, d, I].
    """
    hidden = hidden.float()
    gate_up = torch.einsum("td,nfd->ntf", hidden, experts.gate_up_proj.float())  # [N, T, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.einsum("nti,ndi->ntd", experts.act_fn(gate) * up, experts.down_proj.float())


def pairwise_cosine_sum(outputs: torch.Tensor) -> torch.Tensor:
    """Sum over tokens and expert pairs i < j of cos(output_i, output_j): [N, T, d] -> scalar.

    Divide by T * N * (N - 1) / 2 for the mean.
    """
    unit = torch.nn.functional.normalize(outputs, dim=-1)
    similarity = torch.einsum("itd,jtd->ij", unit, unit)  # summed over tokens
    pairs = torch.triu_indices(outputs.shape[0], outputs.shape[0], offset=1)
    return similarity[pairs[0], pairs[1]].sum()
