"""Head grouping, router counts and router weights from attention (method.md part 2)."""
import itertools
import math

import pytest
import torch

from router_upcycling.errors import SettingError
from router_upcycling.init.grouping import group_heads, head_keys_from_kv, router_weights_from_attention, split_query_heads
from router_upcycling.mor import expert_key_indices, mor_expert_logits
from router_upcycling.settings.routers import check_router_count, valid_router_counts


def reference_greedy_grouping(blocks, group_size):
    """method.md's greedy grouping, written with plain Python loops over float similarities."""
    flat = [block.flatten().double() for block in blocks]
    count = len(flat)
    similarity = [[float(flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm())) for j in range(count)] for i in range(count)]
    unassigned = set(range(count))
    groups = []
    while unassigned:
        best_pair = None
        for i, j in itertools.combinations(sorted(unassigned), 2):
            if best_pair is None or similarity[i][j] > similarity[best_pair[0]][best_pair[1]]:
                best_pair = (i, j)
        group = list(best_pair)
        unassigned -= set(group)
        while len(group) < group_size:
            best = None
            for head in sorted(unassigned):
                mean = sum(similarity[head][member] for member in group) / len(group)
                if best is None or mean > best[0]:
                    best = (mean, head)
            group.append(best[1])
            unassigned.discard(best[1])
        groups.append(sorted(group))
    return sorted(groups)


def noisy_copies_of_prototypes(num_prototypes, copies, shape, seed):
    """Heads that are noisy copies of a few random prototypes, shuffled; returns (blocks, true groups)."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_prototypes, *shape, generator=generator)
    owner = torch.arange(num_prototypes).repeat_interleave(copies)
    order = torch.randperm(len(owner), generator=generator)
    owner = owner[order]
    blocks = prototypes[owner] + 0.05 * torch.randn(len(owner), *shape, generator=generator)
    true_groups = sorted(sorted(torch.nonzero(owner == p).flatten().tolist()) for p in range(num_prototypes))
    return blocks, true_groups


@pytest.mark.parametrize("group_size", [2, 4])
def test_noisy_copies_are_grouped_with_their_prototype(group_size):
    blocks, true_groups = noisy_copies_of_prototypes(16 // group_size, group_size, (8, 32), seed=group_size)
    assert group_heads(blocks, 16 // group_size) == true_groups


@pytest.mark.parametrize("num_heads,group_size", [(8, 2), (16, 2), (16, 4), (12, 3), (16, 8)])
def test_grouping_matches_loop_reference(num_heads, group_size):
    blocks = torch.randn(num_heads, 4, 16, generator=torch.Generator().manual_seed(num_heads * 10 + group_size))
    assert group_heads(blocks, num_heads // group_size) == reference_greedy_grouping(blocks, group_size)


def unit_blocks(directions, dim=4):
    return torch.eye(dim)[directions].view(len(directions), 1, dim)


def test_pair_ties_go_to_lowest_indices():
    blocks = unit_blocks([0, 1, 0, 1, 0, 1])  # every same-direction pair has similarity exactly 1
    assert group_heads(blocks, 3) == [[0, 2], [1, 3], [4, 5]]


def test_growth_ties_go_to_lowest_index():
    # after the pair (0, 1), heads 2..5 all have mean similarity 0 to it: head 2 joins
    blocks = unit_blocks([0, 0, 1, 2, 1, 2])
    assert group_heads(blocks, 2) == [[0, 1, 2], [3, 4, 5]]


def test_groups_of_one_keep_head_order():
    blocks = torch.randn(6, 2, 5)
    assert group_heads(blocks, 6) == [[h] for h in range(6)]


def test_groups_and_keys_are_concatenated_in_group_order():
    num_heads, head_dim, hidden = 8, 4, 12
    generator = torch.Generator().manual_seed(3)
    q_weight = torch.randn(num_heads * head_dim, hidden, generator=generator)
    head_keys = torch.randn(num_heads, head_dim, generator=generator)
    query_weight, keys, groups = router_weights_from_attention(q_weight, head_keys, num_heads, num_routers=4, num_experts=4)
    assert groups == group_heads(q_weight.view(num_heads, head_dim, hidden), 4)
    assert query_weight.shape == (4, 8, hidden) and keys.shape == (4, 8)
    for router, group in enumerate(groups):
        assert torch.equal(query_weight[router], torch.cat([q_weight[h * head_dim:(h + 1) * head_dim] for h in group]))
        assert torch.equal(keys[router], torch.cat([head_keys[h] for h in group]))


def test_more_routers_than_heads_split_each_head_into_contiguous_parts():
    num_heads, head_dim, hidden, num_routers = 2, 4, 3, 4
    q_weight = torch.arange(num_heads * head_dim * hidden, dtype=torch.float32).view(num_heads * head_dim, hidden)
    parts = split_query_heads(q_weight, num_heads, num_routers)
    assert parts.shape == (4, 2, hidden)
    assert torch.equal(parts[1], q_weight[2:4])  # head 0, second half
    assert torch.equal(parts[2], q_weight[4:6])  # head 1, first half
    head_keys = torch.arange(num_heads * head_dim, dtype=torch.float32).view(num_heads, head_dim) + 100
    query_weight, keys, groups = router_weights_from_attention(q_weight, head_keys, num_heads, num_routers, num_experts=2)
    assert groups == [[0], [1], [2], [3]]
    assert torch.equal(query_weight, parts)
    assert torch.equal(keys, head_keys.view(4, 2))  # key of part p: the matching half of its head's key


def test_fewer_routers_than_experts_duplicate_keys_as_independent_tensors():
    num_heads, head_dim, hidden = 4, 2, 6
    q_weight, head_keys = torch.randn(num_heads * head_dim, hidden), torch.randn(num_heads, head_dim)
    query_weight, keys, _ = router_weights_from_attention(q_weight, head_keys, num_heads, num_routers=2, num_experts=8)
    assert query_weight.shape == (2, 4, hidden) and keys.shape == (8, 4)
    for key in range(8):
        assert torch.equal(keys[key], keys[key % 2])
    keys[2] += 1.0
    assert not torch.equal(keys[2], keys[0])
    query_weight += 1.0
    assert not torch.equal(query_weight[0], q_weight[:4])


def test_more_routers_than_experts_give_each_expert_several_keys():
    num_heads, head_dim, hidden, num_experts = 8, 2, 6, 4
    generator = torch.Generator().manual_seed(5)
    q_weight = torch.randn(num_heads * head_dim, hidden, generator=generator)
    head_keys = torch.randn(num_heads, head_dim, generator=generator)
    query_weight, keys, groups = router_weights_from_attention(q_weight, head_keys, num_heads, 8, num_experts)
    assert keys.shape == (8, 2) and torch.equal(keys, head_keys)
    x = torch.randn(5, hidden, generator=generator)
    scores = x @ (keys @ query_weight.sum(0)).t()  # s_j = sum_r q_r . k_j, [T, K]
    expected = torch.stack([scores[:, expert_key_indices(num_experts, 8)[i]].amax(1) for i in range(num_experts)], 1)
    torch.testing.assert_close(mor_expert_logits(x, query_weight, keys, num_experts), expected)
    assert expert_key_indices(num_experts, 8)[1].tolist() == [1, 5]


def test_gqa_heads_share_their_group_key():
    avg_kv_keys = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    expanded = head_keys_from_kv(avg_kv_keys, num_heads=6)
    assert expanded.tolist() == [[1.0, 2.0]] * 3 + [[3.0, 4.0]] * 3
    with pytest.raises(ValueError):
        head_keys_from_kv(avg_kv_keys, num_heads=5)


def test_router_count_that_does_not_fit_names_the_counts_that_do():
    assert valid_router_counts(14, 64, 8) == [1, 2, 4, 8, 16, 32, 56]  # Qwen2.5-0.5B: 14 heads of 64
    assert valid_router_counts(12, 128, 8) == [1, 2, 4, 8, 16, 24, 32, 48]  # Qwen2.5-1.5B
    with pytest.raises(SettingError, match=r"num_routers 5 .*14 attention heads.*8 experts.*: 1, 2, 4, 8, 16, 32, 56$"):
        check_router_count(num_heads=14, head_dim=64, num_routers=5, num_experts=8)
    with pytest.raises(SettingError, match="router counts that work: 1, 2"):
        router_weights_from_attention(torch.randn(14 * 2, 32), torch.randn(14, 2), 14, 8, 8)  # 4 parts of a 2-row head


def reference_router_weights(q_weight, head_keys, num_heads, num_routers, num_experts):
    """method.md part 2 written out: cut each head into lcm(H, R) / H row parts (with its average key's matching
    slice), group the parts with the loop-written greedy grouping, stack each group's parts in order."""
    head_dim = q_weight.shape[0] // num_heads
    parts_per_head = math.lcm(num_heads, num_routers) // num_heads
    rows = head_dim // parts_per_head
    blocks, keys = [], []
    for head in range(num_heads):
        for part in range(parts_per_head):
            start = head * head_dim + part * rows
            blocks.append(q_weight[start:start + rows])
            keys.append(head_keys[head, part * rows:(part + 1) * rows])
    group_size = len(blocks) // num_routers
    groups = reference_greedy_grouping(torch.stack(blocks), group_size) if group_size > 1 else [[p] for p in range(len(blocks))]
    query_weight = torch.stack([torch.cat([blocks[p] for p in group]) for group in groups])
    router_keys = torch.stack([torch.cat([keys[p] for p in group]) for group in groups])
    return query_weight, router_keys[[j % num_routers for j in range(max(num_routers, num_experts))]], groups


@pytest.mark.parametrize("num_heads,head_dim,num_routers,num_experts", [
    (14, 8, 8, 8),   # Qwen2.5-0.5B's 14 heads at R = 8: 56 quarter-heads, 7 per router
    (12, 4, 8, 8),   # Qwen2.5-1.5B's 12 heads: 24 half-heads, 3 per router
    (28, 4, 8, 8),   # Qwen2.5-7B's 28 heads: 56 half-heads, 7 per router
    (6, 8, 4, 8),    # R < N with cut heads
    (8, 8, 4, 4),    # R divides H: whole heads, the paper's rule
    (4, 8, 8, 8),    # H divides R: the paper's R > H rule
])
def test_cut_heads_match_the_written_out_rule(num_heads, head_dim, num_routers, num_experts):
    generator = torch.Generator().manual_seed(num_heads * 100 + num_routers)
    q_weight = torch.randn(num_heads * head_dim, 16, generator=generator, dtype=torch.float64)
    head_keys = torch.randn(num_heads, head_dim, generator=generator, dtype=torch.float64)
    query_weight, keys, groups = router_weights_from_attention(q_weight, head_keys, num_heads, num_routers, num_experts)
    expected_query, expected_keys, expected_groups = reference_router_weights(q_weight, head_keys, num_heads, num_routers, num_experts)
    assert groups == expected_groups
    assert query_weight.shape == (num_routers, num_heads * head_dim // num_routers, 16)
    torch.testing.assert_close(query_weight, expected_query, rtol=0, atol=0)
    torch.testing.assert_close(keys, expected_keys, rtol=0, atol=0)


@pytest.mark.parametrize("num_routers", [2, 4, 8, 16, 32])
def test_paper_router_counts_fit_qwen1_5_0_5b(num_routers):
    check_router_count(num_heads=16, head_dim=64, num_routers=num_routers, num_experts=8)


@pytest.mark.parametrize(
    "num_heads,head_dim,num_routers,num_experts",
    [(12, 64, 3, 8), (16, 64, 6, 8), (4, 6, 16, 8), (8, 64, 24, 8), (8, 64, 0, 8)],
)
def test_uncovered_router_counts_are_refused(num_heads, head_dim, num_routers, num_experts):
    with pytest.raises(SettingError):
        check_router_count(num_heads, head_dim, num_routers, num_experts)


def test_router_parameter_count_of_qwen1_5_0_5b():
    num_heads, head_dim, hidden = 16, 64, 1024
    query_weight, keys, _ = router_weights_from_attention(
        torch.randn(num_heads * head_dim, hidden), torch.randn(num_heads, head_dim), num_heads, 8, 8
    )
    assert query_weight.shape == (8, 128, hidden) and keys.shape == (8, 128)
    assert query_weight.numel() + keys.numel() == 8 * 128 * 1024 + 8 * 128 == 1_049_600


def test_breaking_ties_moves_only_tied_experts_by_a_small_fixed_amount():
    from router_upcycling.init.grouping import TIE_BREAK_SCALE, break_ties, tied_experts

    generator = torch.Generator().manual_seed(0)
    distinct = torch.randn(4, 6, generator=generator)
    keys = torch.cat([distinct[:2], distinct[:1], distinct[2:3], distinct[:1]])  # experts 0, 2, 4 tied; 1 and 3 not
    assert tied_experts(keys, 5) == [[0, 2, 4]]
    broken = break_ties(keys, 5, layer=3)
    assert tied_experts(broken, 5) == []
    torch.testing.assert_close(broken[[0, 1, 3]], keys[[0, 1, 3]], rtol=0, atol=0)  # the first of a group and the untied
    moved = (broken - keys).norm(dim=1) / keys.norm(dim=1)
    torch.testing.assert_close(moved[[2, 4]], torch.full((2,), TIE_BREAK_SCALE), rtol=1e-5, atol=0)
    torch.testing.assert_close(break_ties(keys, 5, layer=3), broken, rtol=0, atol=0)  # deterministic
    assert not torch.equal(break_ties(keys, 5, layer=4), broken)  # and different per layer
    several = torch.cat([keys, keys])  # K = 10 keys for N = 5: experts hold keys {i, i + 5}
    assert tied_experts(several, 5) == [[0, 2, 4]] and tied_experts(break_ties(several, 5, layer=0), 5) == []
