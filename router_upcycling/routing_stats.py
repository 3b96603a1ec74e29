"""Routing health: six numbers per MoE layer from its router logits and the experts it chose. Pure torch.

One implementation for training (router_upcycling.train.metrics, on megatron-core's routers) and for
analysis (router_upcycling.analyze, on Hugging Face gates): each router call adds `routing_sums` of its
batch into its layer's row (on the device, no host sync), and `routing_health` reads the numbers off
the summed rows. Sums add up over micro-batches, steps and ranks, so the numbers cover every token
counted, not a mean of per-batch figures.

Definitions, over the T tokens counted (z_t the token's N logits, C_t the experts chosen for it):
- share_e: the share of routing slots (token, chosen expert) that went to expert e; sums to 1.
- `max_share` = max_e share_e: 1/N is perfect balance, 1 means every slot went to one expert.
- `dead_experts`: how many experts have share_e < 0.1 / N (under 10% of a fair share).
- `top1_weight`: mean over tokens of the largest routing weight, the weights being the softmax of z_t
  over C_t. That is megatron-core's probs renormalised over the chosen k (softmax score function,
  with or without pre-softmax, expert bias or capacity dropping) and stock Qwen2-MoE's top-k weights
  with `norm_topk_prob`. 1/k: the chosen experts weigh the same; 1: one expert decides. Tokens
  left with no expert (capacity dropping) are not counted.
- `logit_std`: the standard deviation (population) of all T x N logits, pooled over tokens and experts.
- `entropy`: natural-log entropy of the mean routing distribution p = mean_t softmax(z_t) over all N
  experts; ln N when the soft routing is balanced, 0 when all of it goes to one expert.
- `tied_choice`: the share of routed tokens two of whose chosen experts have exactly equal logits. Experts that
  start with identical keys (grouped-query attention, docs/method.md part 2) tie on every token; they get the
  same routing weight and gradient, and nothing separates them. 0 for a healthy router.

Shape legend: T tokens, N experts, W = 2N + 6 sums per layer, L layers.
"""
import math
from typing import Dict, List

import torch

HEALTH_KEYS = ("max_share", "dead_experts", "top1_weight", "logit_std", "entropy", "tied_choice")
SUMS_AFTER_EXPERTS = 6  # the sums after the two per-expert blocks
DEAD_FRACTION = 0.1  # of a fair share 1/N


def sums_width(num_experts: int) -> int:
    """W: slot counts [N], probability sums [N], then top-1 weight sum, routed tokens, logit sum, logit square sum, tokens,
    tokens with tied choices."""
    return 2 * num_experts + SUMS_AFTER_EXPERTS


@torch.no_grad()
def routing_sums(logits: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
    """What one router call adds to its layer's row: logits [..., N], routing_map [T, N] (bool) -> [W] float64.

    Per-token arithmetic in float32 (megatron-core computes router logits in float32), sums in float64.
    Runs on the logits' device without a host sync (no boolean indexing, no Python numbers from tensors).
    """
    num_experts = routing_map.shape[-1]
    logits = logits.detach().reshape(-1, num_experts).float()  # [T, N]
    chosen = routing_map.reshape(-1, num_experts)
    chosen_logits = logits.masked_fill(~chosen, -math.inf)
    # softmax over the chosen experts, shifted by their own largest logit: its largest weight is 1 / sum(exp(z - max))
    top1 = (chosen_logits - chosen_logits.amax(-1, keepdim=True)).exp().sum(-1).reciprocal()  # [T]; NaN if none chosen
    routed = chosen.any(-1)
    # two chosen experts with exactly equal logits: neighbours among the chosen logits sorted in descending order
    ordered = chosen_logits.sort(-1, descending=True).values
    tied = ((ordered[:, 1:] == ordered[:, :-1]) & ordered[:, 1:].isfinite()).any(-1)
    f64 = torch.float64
    return torch.cat([
        chosen.sum(0, dtype=f64),
        torch.softmax(logits, -1).sum(0, dtype=f64),
        torch.where(routed, top1, 0.0).sum(dtype=f64).view(1),
        routed.sum(dtype=f64).view(1),
        logits.sum(dtype=f64).view(1),
        logits.double().square().sum().view(1),
        logits.new_full((1,), logits.shape[0], dtype=f64),
        tied.sum(dtype=f64).view(1),
    ])


def _num_experts(sums: torch.Tensor) -> int:
    return (sums.shape[-1] - SUMS_AFTER_EXPERTS) // 2


def counted_tokens(sums: torch.Tensor) -> torch.Tensor:
    """The tokens each layer's row counted: [L, W] -> [L]."""
    return sums[:, 2 * _num_experts(sums) + 4]


def expert_shares(sums: torch.Tensor) -> torch.Tensor:
    """Each layer's share of routing slots per expert: [L, W] -> [L, N], rows sum to 1 (0 where nothing was counted)."""
    counts = sums[:, :_num_experts(sums)].double()
    return counts / counts.sum(-1, keepdim=True).clamp(min=1)


def routing_health(sums: torch.Tensor) -> List[Dict[str, float]]:
    """The six numbers of each layer from its summed row: [L, W] -> L dicts keyed by HEALTH_KEYS (one host sync).

    A layer that counted no token reads 0 everywhere.
    """
    sums = sums.double()
    num_experts = _num_experts(sums)
    share, prob_sums = expert_shares(sums), sums[:, num_experts:2 * num_experts]
    top1_sum, routed, logit_sum, logit_square_sum, tokens, tied = sums[:, 2 * num_experts:].unbind(-1)
    num_logits = (tokens * num_experts).clamp(min=1)
    mean_logit = logit_sum / num_logits
    mean_probs = prob_sums / tokens.clamp(min=1)[:, None]
    health = torch.stack([
        share.max(-1).values,
        (share < DEAD_FRACTION / num_experts).sum(-1).double() * (routed > 0),
        top1_sum / routed.clamp(min=1),
        (logit_square_sum / num_logits - mean_logit.square()).clamp(min=0).sqrt(),
        -torch.special.xlogy(mean_probs, mean_probs).sum(-1),
        tied / routed.clamp(min=1),
    ], dim=-1)  # [L, 6]
    return [{key: int(value) if key == "dead_experts" else value for key, value in zip(HEALTH_KEYS, row)}
            for row in health.tolist()]
