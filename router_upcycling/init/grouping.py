"""Routers from attention heads: head grouping and router weights (method.md part 2).

Pure torch. Which router counts fit is the router registry's rule (router_upcycling.settings.routers); the
attention statistics (average keys) come from `router_upcycling.init.calibration`.

Shape legend
    H    query heads            H_kv  key/value heads (GQA when H_kv < H)
    d_h  head dim               d     hidden size
    R    routers per layer      N     experts per layer
    P    query parts = lcm(H, R): each head cut into P / H contiguous parts (P = H when R divides H)
    d_p  rows per part = H * d_h / P
    d_r  router dim = H * d_h / R
    K    expert keys = max(R, N)
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F

from router_upcycling.mor import expert_key_indices
from router_upcycling.settings.routers import check_router_count, head_parts


def split_query_heads(q_weight: torch.Tensor, num_heads: int, num_routers: int) -> torch.Tensor:
    """The query blocks that are grouped into routers: [H * d_h, d] -> [P, d_p, d], P = lcm(H, R).

    R divides H: the H head blocks Q_h. Otherwise each head is cut into c = P/H contiguous row parts, part
    p = h * c + j holding rows j*d_p .. (j+1)*d_p of head h.
    """
    num_parts = head_parts(num_heads, num_routers)
    return q_weight.reshape(num_parts, q_weight.shape[0] // num_parts, q_weight.shape[1])


def _cosine_similarity_matrix(query_blocks: torch.Tensor) -> torch.Tensor:
    """[P, d_p, d] -> [P, P] cosine similarity of the flattened blocks, float64."""
    flat = F.normalize(query_blocks.reshape(query_blocks.shape[0], -1).double(), dim=1)
    return flat @ flat.t()


def _most_similar_pair(similarity: torch.Tensor, unassigned: torch.Tensor) -> List[int]:
    """The unassigned pair (i < j) of highest similarity; ties go to the lowest (i, j)."""
    num_parts = similarity.shape[0]
    candidates = torch.triu(unassigned[:, None] & unassigned[None, :], diagonal=1)
    masked = similarity.masked_fill(~candidates, float("-inf"))
    flat_index = int(torch.argmax(masked))  # argmax returns the first maximum: row-major = lowest (i, j)
    return [flat_index // num_parts, flat_index % num_parts]


def _best_addition(similarity: torch.Tensor, unassigned: torch.Tensor, members: List[int]) -> int:
    """The unassigned head of highest mean similarity to the members; ties go to the lowest index."""
    mean_similarity = similarity[:, members].mean(dim=1).masked_fill(~unassigned, float("-inf"))
    return int(torch.argmax(mean_similarity))


def group_heads(query_blocks: torch.Tensor, num_groups: int) -> List[List[int]]:
    """Greedy cosine grouping of P query blocks [P, d_p, d] into num_groups groups of P / num_groups.

    Take the most similar pair of unassigned heads, grow the group with the unassigned head of highest
    mean similarity to its members until it is full, repeat. Groups are ordered by their smallest head
    index; heads ascend within a group.
    """
    num_parts = query_blocks.shape[0]
    if num_groups < 1 or num_parts % num_groups:
        raise ValueError(f"{num_parts} heads cannot be split into {num_groups} equal groups")
    group_size = num_parts // num_groups
    if group_size == 1:
        return [[head] for head in range(num_parts)]
    similarity = _cosine_similarity_matrix(query_blocks)
    unassigned = torch.ones(num_parts, dtype=torch.bool)
    groups = []
    for _ in range(num_groups):
        members = _most_similar_pair(similarity, unassigned)
        unassigned[members] = False
        while len(members) < group_size:
            head = _best_addition(similarity, unassigned, members)
            members.append(head)
            unassigned[head] = False
        groups.append(sorted(members))
    return sorted(groups)


def head_keys_from_kv(avg_kv_keys: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Average key of every query head, [H_kv, d_h] -> [H, d_h]: head h uses KV group h // (H / H_kv)."""
    num_kv_heads = avg_kv_keys.shape[0]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} key/value heads evenly")
    return avg_kv_keys.repeat_interleave(num_heads // num_kv_heads, dim=0)


def router_weights_from_attention(
    q_weight: torch.Tensor,
    head_keys: torch.Tensor,
    num_heads: int,
    num_routers: int,
    num_experts: int,
) -> Tuple[torch.Tensor, torch.Tensor, List[List[int]]]:
    """Mixture-of-Routers weights of one layer from its attention.

    Args:
        q_weight: q_proj.weight [H * d_h, d] (the q bias is not used).
        head_keys: average key of every query head [H, d_h] (see head_keys_from_kv).
        num_heads: H.
        num_routers: R.
        num_experts: N.

    Returns:
        query_weight [R, d_r, d]: router r's rows are its group's query blocks, concatenated in group order.
        keys [K, d_r]: key j is group (j mod R)'s key, the matching parts of its heads' average keys
            concatenated likewise; expert i holds keys {i, i+N, ...} (router_upcycling.mor).
        groups: the P-part indices of each router (P = lcm(H, R)).
    """
    head_dim = q_weight.shape[0] // num_heads
    if q_weight.shape[0] != num_heads * head_dim or tuple(head_keys.shape) != (num_heads, head_dim):
        raise ValueError(
            f"expected q_weight [{num_heads} * head_dim, d] and head_keys [{num_heads}, head_dim], "
            f"got {tuple(q_weight.shape)} and {tuple(head_keys.shape)}"
        )
    check_router_count(num_heads, head_dim, num_routers, num_experts)
    query_blocks = split_query_heads(q_weight, num_heads, num_routers)  # [P, d_p, d]
    key_parts = head_keys.reshape(query_blocks.shape[0], query_blocks.shape[1])  # [P, d_p]
    groups = group_heads(query_blocks, num_routers)
    query_weight = torch.stack([query_blocks[group].reshape(-1, q_weight.shape[1]) for group in groups])
    group_keys = torch.stack([key_parts[group].reshape(-1) for group in groups])  # [R, d_r]
    key_groups = torch.arange(max(num_routers, num_experts)) % num_routers  # key j <- router j mod R, K = max(R, N)
    return query_weight, group_keys[key_groups], groups  # stack and indexing copy: no storage is shared


def tied_experts(keys: torch.Tensor, num_experts: int) -> List[List[int]]:
    """Groups of two or more experts that hold exactly the same keys [K, d_r] (expert i holds keys {i, i+N, ...}).

    Such experts start with identical logits for every token; a group of exactly top-k is chosen together and, being
    copies of one FFN, trained alike (nothing separates it), a larger one is split by top-k's tie-break, which leaves
    the rest unchosen until the keys move (docs/method.md part 2). Grouped-query attention makes this happen (query heads of one KV group share their
    average key), and so do R < N routers (keys duplicated N/R times).
    """
    indices = expert_key_indices(num_experts, keys.shape[0])  # [N, K / N]
    holders: dict = {}
    for expert in range(num_experts):
        held = tuple(sorted(tuple(row) for row in keys[indices[expert]].tolist()))  # an expert takes the max: a set
        holders.setdefault(held, []).append(expert)
    return [experts for experts in holders.values() if len(experts) > 1]


TIE_BREAK_SCALE = 1e-2  # of a key's norm


def break_ties(keys: torch.Tensor, num_experts: int, layer: int, scale: float = TIE_BREAK_SCALE) -> torch.Tensor:
    """The keys [K, d_r] with exact ties broken and nothing else changed (router init `perturb`).

    In every group of experts that hold identical keys (tied_experts), the first keeps its keys; each other member's
    keys move by `scale` times their norm along a fixed pseudo-random direction (seeded by layer and expert, so the
    result is deterministic), enough to give the experts different logits and so different tokens and gradients.
    """
    keys = keys.clone()
    indices = expert_key_indices(num_experts, keys.shape[0])
    for group in tied_experts(keys, num_experts):
        for expert in group[1:]:
            generator = torch.Generator().manual_seed(1_000_003 * layer + expert)
            for key in indices[expert].tolist():
                direction = torch.randn(keys.shape[1], generator=generator, dtype=torch.float64)
                keys[key] += (scale * keys[key].double().norm() * direction / direction.norm()).to(keys.dtype)
    return keys
