"""The HF `mor` model: router contract and one MoE layer against a direct, loop-based reference (CPU, float32)."""
import pytest
import torch
import torch.nn.functional as F
from hf_test_support import logits_in_fresh_interpreter

from router_upcycling.hf import Qwen2MoRConfig, Qwen2MoRForCausalLM
from router_upcycling.hf.modeling_mor import MoRSparseMoeBlock, Qwen2MoeExperts

HIDDEN, EXPERTS, INTERMEDIATE = 32, 4, 24


def tiny_config(router_type: str = "mor", num_experts: int = EXPERTS, num_routers: int = 4, aggregation: str = "sum", **overrides) -> Qwen2MoRConfig:
    fields = dict(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        moe_intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=num_experts,
        num_experts_per_tok=1 if router_type == "switch" else 2,
        router_type=router_type,
        num_routers=num_routers,
        router_dim=HIDDEN // num_routers,
        num_router_keys=max(num_routers, num_experts),
        router_aggregation=aggregation,
    )
    return Qwen2MoRConfig(**{**fields, **overrides})


def random_block(config: Qwen2MoRConfig, seed: int = 0) -> MoRSparseMoeBlock:
    torch.manual_seed(seed)
    block = MoRSparseMoeBlock(config, Qwen2MoeExperts)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.3)
    return block


def reference_logits(block: MoRSparseMoeBlock, config: Qwen2MoRConfig, x: torch.Tensor) -> torch.Tensor:
    """Router logits z [N] of one token x [d], written out from method.md section 3 / the baselines."""
    gate = block.gate
    if config.router_type in ("linear", "switch"):
        return torch.stack([gate.weight[i] @ x for i in range(config.num_experts)])
    if config.router_type == "mlp":
        return gate.fc2.weight @ F.gelu(gate.fc1.weight @ x)
    if config.router_type == "locmoe":  # GrAP: ReLU of the mean of each of N contiguous channel groups
        group = HIDDEN // config.num_experts
        return torch.stack([F.relu(x[i * group:(i + 1) * group].mean()) for i in range(config.num_experts)])
    queries = [gate.query_weight[r] @ x for r in range(config.num_routers)]
    key_scores = []
    for key in gate.keys:
        per_router = torch.stack([query @ key for query in queries])
        key_scores.append(per_router.sum() if config.router_aggregation == "sum" else per_router.max())
    # expert i holds keys i, i + N, i + 2N, ...
    return torch.stack(
        [max(key_scores[j] for j in range(i, config.num_router_keys, config.num_experts)) for i in range(config.num_experts)]
    ) * config.router_scale


def reference_moe_layer(block: MoRSparseMoeBlock, config: Qwen2MoRConfig, hidden: torch.Tensor) -> torch.Tensor:
    """Sum over the top-k experts of softmax(top-k logits) * SwiGLU expert(x), token by token: [T, d] -> [T, d]."""
    out = torch.zeros_like(hidden)
    top_k = config.num_experts_per_tok
    for t, x in enumerate(hidden):
        logits = reference_logits(block, config, x)
        chosen = sorted(range(config.num_experts), key=lambda i: -logits[i].item())[:top_k]
        weights = torch.softmax(torch.stack([logits[i] for i in chosen]), dim=0)
        for weight, expert in zip(weights, chosen):
            gate_up = block.experts.gate_up_proj[expert] @ x
            gate, up = gate_up[:INTERMEDIATE], gate_up[INTERMEDIATE:]
            out[t] += weight * (block.experts.down_proj[expert] @ (F.silu(gate) * up))
    return out


ROUTER_CASES = {
    "mor-sum": dict(router_type="mor"),
    "mor-max": dict(router_type="mor", aggregation="max"),
    "mor-multikey-R16-N8": dict(router_type="mor", num_routers=16, num_experts=8),
    "mor-fewer-routers-R2-N4": dict(router_type="mor", num_routers=2),
    "mor-scaled": dict(router_type="mor", router_scale=0.5),
    "linear": dict(router_type="linear"),
    "switch": dict(router_type="switch"),
    "mlp": dict(router_type="mlp"),
    "locmoe": dict(router_type="locmoe"),
    "locmoe-N8-top1": dict(router_type="locmoe", num_experts=8, num_experts_per_tok=1),
}


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_moe_layer_matches_loop_reference(case):
    config = tiny_config(**ROUTER_CASES[case])
    block = random_block(config)
    hidden = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
    if config.router_type == "locmoe":
        # ReLU makes ties at 0 common, and torch.topk breaks ties its own way: keep every group mean positive
        hidden = hidden.abs() + 0.1
    with torch.no_grad():
        out = block(hidden)
        expected = reference_moe_layer(block, config, hidden.view(-1, HIDDEN))
    torch.testing.assert_close(out.view(-1, HIDDEN), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router_type", ["mor", "linear", "switch", "mlp", "locmoe"])
def test_router_contract(router_type):
    config = tiny_config(router_type)
    gate = random_block(config).gate
    hidden = torch.randn(7, HIDDEN, dtype=torch.bfloat16)
    logits, weights, index = gate(hidden)
    top_k = config.num_experts_per_tok
    assert logits.shape == (7, EXPERTS) and logits.dtype == torch.float32
    assert weights.shape == index.shape == (7, top_k) and weights.dtype == torch.bfloat16
    torch.testing.assert_close(weights.float().sum(-1), torch.ones(7), atol=1e-2, rtol=0)
    assert torch.equal(index, logits.topk(top_k, dim=-1).indices)


def test_model_reports_router_logits_and_aux_loss():
    config = tiny_config()
    model = Qwen2MoRForCausalLM(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 6))
    out = model(input_ids, labels=input_ids, output_router_logits=True)
    assert len(out.router_logits) == config.num_hidden_layers
    assert out.router_logits[0].shape == (12, EXPERTS)
    assert out.aux_loss is not None and torch.isfinite(out.loss)


def test_model_has_no_shared_expert():
    names = [name for name, _ in Qwen2MoRForCausalLM(tiny_config()).named_parameters()]
    assert not [name for name in names if "shared_expert" in name]
    assert "model.layers.0.mlp.gate.query_weight" in names and "model.layers.1.mlp.experts.gate_up_proj" in names


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(router_type="gru"), "router_type"),
        (dict(router_aggregation="mean"), "router_aggregation"),
        (dict(num_router_keys=6), "multiple of num_experts"),
        (dict(router_type="switch", num_experts_per_tok=2), "1 expert"),
        (dict(shared_expert_intermediate_size=16), "no shared expert"),
        (dict(router_type="locmoe", num_experts=3), "divide hidden_size"),
    ],
)
def test_model_rejects_bad_router_fields(fields, message):
    """The config holds the fields; the gate that router_type names refuses the ones it cannot follow."""
    with pytest.raises(ValueError, match=message):
        Qwen2MoRForCausalLM(tiny_config(**fields))


def test_save_pretrained_writes_a_self_contained_folder(tmp_path):
    """save_pretrained from the package classes: auto_map, code files and the REAL router math (not the shim)."""
    torch.manual_seed(0)
    model = Qwen2MoRForCausalLM(tiny_config(num_routers=2, router_scale=2.0)).eval()
    model.save_pretrained(tmp_path / "saved")
    assert "def mor_expert_logits" in (tmp_path / "saved" / "mor.py").read_text()
    input_ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        expected = model(input_ids).logits
    logits = logits_in_fresh_interpreter([str(tmp_path / "saved")], input_ids, str(tmp_path))
    torch.testing.assert_close(logits[str(tmp_path / "saved")], expected, atol=1e-5, rtol=0)
