"""Routing health (router_upcycling.routing_stats) against a direct per-token computation and known routings."""
import math

import pytest
import torch

from router_upcycling.routing_stats import HEALTH_KEYS, expert_shares, routing_health, routing_sums, sums_width


def direct_health(logits, routing_map):
    """The definitions of routing_stats' docstring, token by token: logits [T, N], routing_map [T, N] bool."""
    num_tokens, num_experts = logits.shape
    slots = [sum(bool(routing_map[t, e]) for t in range(num_tokens)) for e in range(num_experts)]
    shares = [count / sum(slots) for count in slots]
    top1 = []
    for t in range(num_tokens):
        chosen = [e for e in range(num_experts) if routing_map[t, e]]
        if chosen:
            weights = torch.softmax(logits[t, chosen], -1)
            top1.append(weights.max().item())
    mean_probs = torch.stack([torch.softmax(logits[t], -1) for t in range(num_tokens)]).mean(0)
    return {
        "max_share": max(shares),
        "dead_experts": sum(share < 0.1 / num_experts for share in shares),
        "top1_weight": sum(top1) / len(top1),
        "logit_std": logits.flatten().std(unbiased=False).item(),
        "entropy": -sum(p * math.log(p) for p in mean_probs.tolist() if p > 0),
    }


def summed(logits, routing_map, batches):
    """One layer's row, the batches' sums added up as the training counter and the analysis add them: [1, W]."""
    return torch.stack([routing_sums(z, m) for z, m in zip(logits.split(batches), routing_map.split(batches))]).sum(0)[None]


def top_k_map(scores, k):
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, -1).indices, True)


@pytest.mark.parametrize("num_experts,k", [(4, 2), (8, 2), (6, 1)])
def test_health_matches_a_direct_computation(num_experts, k):
    generator = torch.Generator().manual_seed(num_experts * 10 + k)
    logits = torch.randn(37, num_experts, generator=generator, dtype=torch.float64) * 3 + 1.5
    logits[:, 0] += 2.0  # a popular expert
    bias = torch.zeros(num_experts, dtype=torch.float64)
    bias[-1] = 1.0  # expert-bias routing: the chosen set is not the top-k of the logits themselves
    routing_map = top_k_map(logits + bias, k)
    routing_map[5] = False  # a token dropped by capacity: in no share and no top-1 weight
    [health] = routing_health(summed(logits, routing_map, 10))
    expected = direct_health(logits, routing_map)
    assert list(health) == list(HEALTH_KEYS)
    assert isinstance(health["dead_experts"], int) and health["dead_experts"] == expected["dead_experts"]
    for key in ("max_share", "top1_weight", "logit_std", "entropy"):
        assert health[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key  # float32 per token
    assert 1 / num_experts <= health["max_share"] <= 1 and 1 / k <= health["top1_weight"] <= 1
    assert 0 <= health["entropy"] <= math.log(num_experts)


def test_known_routings_read_their_textbook_values():
    num_experts, tokens = 4, 8
    balanced = torch.zeros(tokens, num_experts)  # equal logits, tokens spread round-robin over pairs of experts
    balanced_map = torch.zeros(tokens, num_experts, dtype=torch.bool)
    for t in range(tokens):
        balanced_map[t, [t % num_experts, (t + 1) % num_experts]] = True
    collapsed = torch.tensor([[40.0, 0.0, 0.0, 0.0]]).expand(tokens, -1)  # one expert decides, the others never chosen
    collapsed_map = top_k_map(collapsed + torch.tensor([0.0, 1.0, 0.0, 0.0]), 2)
    rows = torch.cat([summed(balanced, balanced_map, 3), summed(collapsed, collapsed_map, 3), torch.zeros(1, sums_width(4))])
    even, collapsed_health, empty = routing_health(rows)
    assert even == pytest.approx({"max_share": 0.25, "dead_experts": 0, "top1_weight": 0.5, "logit_std": 0.0,
                                  "entropy": math.log(4), "tied_choice": 1.0})  # equal logits: every choice is a tie
    assert collapsed_health["tied_choice"] == 0.0
    assert collapsed_health["max_share"] == 0.5 and collapsed_health["dead_experts"] == 2
    assert collapsed_health["top1_weight"] == pytest.approx(1.0) and collapsed_health["entropy"] == pytest.approx(0.0, abs=1e-15)
    assert collapsed_health["logit_std"] == pytest.approx(40 * math.sqrt(3) / 4)
    assert empty == {key: 0 for key in HEALTH_KEYS}
    torch.testing.assert_close(expert_shares(rows)[:2], torch.tensor([[0.25] * 4, [0.5, 0.5, 0.0, 0.0]], dtype=torch.float64))


def test_tied_choices_count_tokens_whose_chosen_experts_have_equal_logits():
    """Experts 0 and 1 hold the same logits (identical keys), experts 2 and 3 differ; k = 2 and k = 3."""
    logits = torch.tensor([[2.0, 2.0, 1.0, -1.0],   # chooses 0, 1: tied
                           [1.0, 1.0, 3.0, 0.0],    # chooses 2 and one of 0, 1: no tie among the chosen two
                           [0.5, 0.5, 0.0, 4.0]])   # chooses 3 and 0 (or 1)
    [two] = routing_health(routing_sums(logits, top_k_map(logits, 2))[None])
    [three] = routing_health(routing_sums(logits, top_k_map(logits, 3))[None])
    assert two["tied_choice"] == pytest.approx(1 / 3) and three["tied_choice"] == pytest.approx(1.0)


def test_sums_take_any_logit_layout_and_dtype():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2, 4, generator=generator)  # megatron's [S, B, N]
    routing_map = top_k_map(logits.reshape(-1, 4), 2)
    flat = routing_sums(logits.reshape(-1, 4).double(), routing_map)
    assert flat.shape == (sums_width(4),) and flat.dtype == torch.float64
    torch.testing.assert_close(routing_sums(logits, routing_map), flat, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(routing_sums(logits.bfloat16(), routing_map), routing_sums(logits.bfloat16().float(), routing_map))
