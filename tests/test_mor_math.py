"""Router math against direct loops: Mixture-of-Routers over routers, keys and experts (method.md part 3);
LocMoE's GrAP gate over channel groups and its locality loss, with a finite-difference gradient check."""
import math

import pytest
import torch

from router_upcycling.errors import SettingError
from router_upcycling.mor import (
    expert_key_indices, fold_to_linear_gate, grap_expert_logits, key_scores, locality_loss, mor_expert_logits,
    routing_distribution,
)
from router_upcycling.settings.moe import MoESettings
from router_upcycling.settings.routers import MOR, check_grap_split, grap_expert_counts


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
    num_keys = max(num_routers, num_experts)
    x = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    query_weight = torch.randn(num_routers, router_dim, hidden, generator=generator, dtype=torch.float64)
    keys = torch.randn(num_keys, router_dim, generator=generator, dtype=torch.float64)
    logits = mor_expert_logits(x, query_weight, keys, num_experts, aggregation)
    assert logits.shape == (tokens, num_experts)
    torch.testing.assert_close(logits, loop_reference(x, query_weight, keys, num_experts, aggregation), rtol=1e-10, atol=1e-10)


def normed_loop_reference(x, query_weight, keys, num_experts, aggregation, gain, eps):
    """Each router's query, head by head through RMS norm (d_h = len(gain)) as a QK-norm attention does, then scored."""
    num_routers, router_dim, _ = query_weight.shape
    head_dim = gain.shape[0]
    logits = torch.empty(x.shape[0], num_experts, dtype=torch.float64)
    for t in range(x.shape[0]):
        queries = []
        for r in range(num_routers):
            query = query_weight[r] @ x[t]
            heads = [query[h:h + head_dim] for h in range(0, router_dim, head_dim)]
            queries.append(torch.cat([gain * head / torch.sqrt((head * head).mean() + eps) for head in heads]))
        scores = []
        for j in range(keys.shape[0]):
            per_router = [torch.dot(query, keys[j]) for query in queries]
            scores.append(sum(per_router) if aggregation == "sum" else max(per_router))
        for i in range(num_experts):
            logits[t, i] = max(scores[j] for j in range(keys.shape[0]) if j % num_experts == i)
    return logits


@pytest.mark.parametrize("aggregation", ["sum", "max"])
@pytest.mark.parametrize("num_routers,num_experts,heads_per_router", [(8, 8, 1), (4, 8, 2), (4, 4, 3), (8, 4, 1)])
def test_query_norm_inside_the_routers_matches_loop_reference(aggregation, num_routers, num_experts, heads_per_router):
    generator = torch.Generator().manual_seed(num_routers * 7 + heads_per_router)
    hidden, head_dim, tokens = 24, 4, 6
    router_dim = heads_per_router * head_dim
    x = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    query_weight = torch.randn(num_routers, router_dim, hidden, generator=generator, dtype=torch.float64)
    keys = torch.randn(max(num_routers, num_experts), router_dim, generator=generator, dtype=torch.float64)
    gain = 1 + 0.3 * torch.randn(head_dim, generator=generator, dtype=torch.float64)
    logits = mor_expert_logits(x, query_weight, keys, num_experts, aggregation, 0.5, gain, 1e-6)
    expected = 0.5 * normed_loop_reference(x, query_weight, keys, num_experts, aggregation, gain, 1e-6)
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    # a token scaled up routes alike: the norm removes its scale (the plain routers' logits would grow with it)
    torch.testing.assert_close(mor_expert_logits(5 * x, query_weight, keys, num_experts, aggregation, 0.5, gain, 0.0),
                               mor_expert_logits(x, query_weight, keys, num_experts, aggregation, 0.5, gain, 0.0))


def test_key_count_and_expert_key_map():
    keys = [MoESettings(num_routers=r, num_experts=8).num_keys for r in (8, 32, 2)]
    assert keys == [8, 32, 8]
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
    def refusal(**settings):
        return MOR.linear_gate_refusal(MoESettings(num_experts=8, **settings))

    assert refusal(num_routers=8) is None
    assert "max" in refusal(num_routers=8, aggregation="max") and "2 keys" in refusal(num_routers=16)
    assert "normalise each head" in refusal(num_routers=8, query_norm=True)
    with pytest.raises(ValueError, match="no linear-gate form"):
        fold_to_linear_gate(torch.zeros(2, 3, 4), torch.zeros(8, 3), 4)


def test_unknown_aggregation():
    with pytest.raises(ValueError, match="unknown router aggregation"):
        key_scores(torch.zeros(1, 4), torch.zeros(2, 2, 4), torch.zeros(2, 2), "mean")


def grap_loop_reference(x, num_experts):
    """z[t, i] = max(0, (1/g) * sum of x[t, c] over group i's channels c = i*g ... (i+1)*g - 1)."""
    group = x.shape[1] // num_experts
    logits = torch.empty(x.shape[0], num_experts, dtype=torch.float64)
    for t in range(x.shape[0]):
        for i in range(num_experts):
            logits[t, i] = max(0.0, sum(x[t, c].item() for c in range(i * group, (i + 1) * group)) / group)
    return logits


@pytest.mark.parametrize("hidden,num_experts", [(24, 4), (24, 8), (24, 24), (30, 5), (16, 1)])
def test_grap_logits_match_loop_reference(hidden, num_experts):
    x = torch.randn(9, hidden, generator=torch.Generator().manual_seed(hidden + num_experts), dtype=torch.float64)
    logits = grap_expert_logits(x, num_experts)
    assert logits.shape == (9, num_experts) and (logits >= 0).all() and (logits == 0).any()
    torch.testing.assert_close(logits, grap_loop_reference(x, num_experts), rtol=1e-12, atol=1e-12)


def test_grap_refuses_hidden_sizes_the_expert_count_does_not_divide():
    assert grap_expert_counts(12) == [2, 3, 4, 6, 12]
    assert grap_expert_counts(896)[-3:] == [112, 128, 224] and 512 not in grap_expert_counts(1024)
    with pytest.raises(SettingError, match="896 into .*12 does not divide it; expert counts that work: 2, 4, 7, 8, 14"):
        check_grap_split(896, 12)
    with pytest.raises(ValueError, match="cannot cut 10 channels into 4 equal groups"):
        grap_expert_logits(torch.zeros(3, 10), 4)


def locality_loop_reference(logits):
    """sum_i p_i log(p_i / (1/N)) with p_i the mean over tokens of softmax_i(z_t), written out."""
    tokens, num_experts = logits.shape
    mean = [0.0] * num_experts
    for t in range(tokens):
        exps = [math.exp(z) for z in logits[t].tolist()]
        for i in range(num_experts):
            mean[i] += exps[i] / sum(exps) / tokens
    return sum(p * math.log(p * num_experts) for p in mean)


def locality(logits):
    return locality_loss(routing_distribution(logits).mean(0))


def test_locality_loss_is_kl_of_mean_routing_distribution_to_uniform():
    logits = torch.randn(11, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    assert locality(logits).item() == pytest.approx(locality_loop_reference(logits), rel=1e-12)
    assert locality(torch.zeros(5, 4)).item() == 0.0  # uniform routing
    # every token on expert 0 with certainty: KL(one-hot || uniform) = log N
    assert locality(torch.tensor([[60.0, 0.0, 0.0, 0.0]] * 3)).item() == pytest.approx(math.log(4), rel=1e-6)
    assert routing_distribution(logits.bfloat16()).dtype == torch.float32 and routing_distribution(logits).dtype == torch.float64


def test_locality_gradient_through_grap_matches_finite_differences():
    """The term's only path into the model is the router input x: autograd's d/dx against central differences."""
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = x + 0.1 * torch.sign(x.view(6, 4, 5).mean(-1, keepdim=True)).expand(6, 4, 5).reshape(6, 20)  # no group mean near ReLU's kink
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda inp: locality(grap_expert_logits(inp, 4)), (x,), eps=1e-6, atol=1e-8)
    gradient, = torch.autograd.grad(locality(grap_expert_logits(x, 4)), x)
    assert gradient.abs().sum() > 0
