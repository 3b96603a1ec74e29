"""Router math against a direct loop over routers, keys and experts (method.md part 3)."""
import pytest
import torch

from router_upcycling.mor import (
    can_fold, expert_key_indices, fold_reason, fold_to_linear_gate, key_scores, mor_expert_logits, num_router_keys,
)


def loop_reference(x, query_weight, keys, num_experts, aggregation):
    num_routers, num_keys = query_weight.shape[0], keys.shape[0]
    logits = torch.empty(x.shape[0], num_experts, dtype=torch.float64)
    for t in range(x.shape[0]):
        scores = []
        for j in range(num_keys):
            per_router = [torch.dot(query_weight[r] @ x[t], keys[j]) for r in range(num_routers)]
            scores.append(sum(per_router) if aggregation == "sum" else max(per_router))
        for i in range(num_experts):
            logits[t, i] = max(scores[j] for j in range(num_keys) if j % num_experts == i)
    return logits


@pytest.mark.parametrize("aggregation", ["sum", "max"])
@pytest.mark.parametrize("num_routers,num_experts", [(8, 8), (4, 8), (16, 8), (2, 4), (3, 6), (12, 4), (1, 1)])
def test_expert_logits_match_loop_reference(aggregation, num_routers, num_experts):
    generator = torch.Generator().manual_seed(num_routers * 31 + num_experts)
    hidden, router_dim, tokens = 24, 5, 7
    num_keys = num_router_keys(num_routers, num_experts)
    x = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    query_weight = torch.randn(num_routers, router_dim, hidden, generator=generator, dtype=torch.float64)
    keys = torch.randn(num_keys, router_dim, generator=generator, dtype=torch.float64)
    logits = mor_expert_logits(x, query_weight, keys, num_experts, aggregation)
    assert logits.shape == (tokens, num_experts)
    torch.testing.assert_close(logits, loop_reference(x, query_weight, keys, num_experts, aggregation), rtol=1e-10, atol=1e-10)


def test_key_count_and_expert_key_map():
    assert num_router_keys(8, 8) == 8 and num_router_keys(32, 8) == 32 and num_router_keys(2, 8) == 8
    assert expert_key_indices(4, 12).tolist() == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]]
    with pytest.raises(ValueError):
        expert_key_indices(8, 12)


def test_fold_equals_sum_router():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(10, 16, generator=generator, dtype=torch.float64)
    query_weight = torch.randn(4, 6, 16, generator=generator, dtype=torch.float64)
    keys = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    gate = fold_to_linear_gate(query_weight, keys, 4, "sum", scale=0.5)
    assert gate.shape == (4, 16)
    torch.testing.assert_close(x @ gate.t(), mor_expert_logits(x, query_weight, keys, 4, "sum", scale=0.5))


def test_fold_refuses_nonlinear_routers():
    assert can_fold(8, 8, "sum") and not can_fold(16, 8, "sum") and not can_fold(8, 8, "max")
    assert "max" in fold_reason(8, 8, "max") and "2 keys" in fold_reason(16, 8, "sum")
    with pytest.raises(ValueError, match="no linear-gate form"):
        fold_to_linear_gate(torch.zeros(2, 3, 4), torch.zeros(8, 3), 4)


def test_unknown_aggregation():
    with pytest.raises(ValueError, match="unknown router aggregation"):
        key_scores(torch.zeros(1, 4), torch.zeros(2, 2, 4), torch.zeros(2, 2), "mean")
