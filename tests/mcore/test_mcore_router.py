"""Our routers inside megatron-core's GPTModel, on CPU (gloo), 1 and 2 ranks: Mixture-of-Routers, the
baselines, and LocMoE's parameter-free GrAP gate with its locality loss."""
import pytest
import torch

from distributed import run_distributed
from router_upcycling.convert.upcycle import CalibrationSettings, upcycle
from router_upcycling.mcore.model import build_gpt_model, causal_attention_mask, transformer_config
from router_upcycling.settings.architecture import Architecture
from router_upcycling.settings.moe import MoESettings
from router_upcycling.mor import grap_expert_logits, locality_loss, mor_expert_logits, routing_distribution
from router_upcycling.testing import SAMPLE_TEXT, make_dense_qwen2, tiny_qwen2_config

ARCH = Architecture.from_hf_config(tiny_qwen2_config(vocab_size=256, num_heads=8, num_kv_heads=4).to_dict())


def tokens_and_positions(batch=2, seq=16, seed=0):
    tokens = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return tokens, torch.arange(seq)[None].expand(batch, -1)


def build(moe, **kwargs):
    from router_upcycling.mcore.parallel import initialize_distributed

    initialize_distributed(seed=0, **{k: v for k, v in kwargs.items() if k.endswith("parallel_size")})
    config = transformer_config(ARCH, moe, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001, **kwargs)
    return build_gpt_model(ARCH, moe, config)


@pytest.mark.parametrize("aggregation,num_routers", [("sum", 4), ("max", 8), ("sum", 16)])
def test_forward_backward_reaches_queries_and_keys(aggregation, num_routers):
    model = build(MoESettings(router="mor", num_experts=4, topk=2, num_routers=num_routers, aggregation=aggregation))
    tokens, positions = tokens_and_positions()
    loss = model(tokens, positions, causal_attention_mask(16), labels=tokens).mean()
    loss.backward()
    for layer in model.decoder.layers:
        router = layer.mlp.router
        assert router.weight is None
        for param in (router.query_weight, router.keys):
            assert param.dtype == torch.float32 and hasattr(param, "sequence_parallel")
            assert param.grad is not None and param.grad.abs().sum() > 0


def test_gating_is_the_router_math():
    model = build(MoESettings(router="mor", num_experts=4, topk=2, num_routers=8, aggregation="max"))
    router = model.decoder.layers[0].mlp.router
    x = torch.randn(5, 3, 64)
    expected = mor_expert_logits(x.reshape(-1, 64), router.query_weight, router.keys, 4, "max").view(5, 3, 4)
    torch.testing.assert_close(router.gating(x), expected)


def test_router_parameters_are_in_the_sharded_state_dict():
    model = build(MoESettings(router="mor", num_experts=4, topk=2, num_routers=4))
    keys = set(model.sharded_state_dict())
    assert "decoder.layers.0.mlp.router.query_weight" in keys and "decoder.layers.1.mlp.router.keys" in keys
    assert not any(k.endswith("mlp.router.weight") for k in keys)


@pytest.mark.parametrize("router", ["linear", "mlp", "switch"])
def test_baseline_routers_train(router):
    model = build(MoESettings(router=router, num_experts=4, topk=2))
    tokens, positions = tokens_and_positions()
    model(tokens, positions, causal_attention_mask(16), labels=tokens).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".router." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def _logits_on_ranks(rank, world_size, checkpoint, parallel, backward):
    from router_upcycling.convert.verify import megatron_logits
    from router_upcycling.checkpoint_folder import read_metadata, resolve_iteration_dir
    from router_upcycling.mcore.checkpoint import load_model_weights
    from router_upcycling.mcore.parallel import initialize_distributed

    initialize_distributed(seed=0, **{k: v for k, v in parallel.items() if k.endswith("parallel_size")})
    metadata = read_metadata(checkpoint)
    moe = MoESettings.from_dict(metadata["moe"])
    # experts start identical, so the LM loss alone gives the router no gradient at step 0: the
    # load-balancing loss does
    arch = Architecture.from_hf_config(metadata["hf_config"])
    config = transformer_config(arch, moe, perform_initialization=False, moe_aux_loss_coeff=0.01, **parallel)
    model = build_gpt_model(arch, moe, config)
    load_model_weights(model, resolve_iteration_dir(checkpoint))
    tokens, _ = tokens_and_positions(batch=2, seq=12, seed=3)
    logits = megatron_logits(model.eval(), tokens)
    if not backward:
        return {"logits": logits}
    model.train()
    positions = torch.arange(12)[None].expand(2, -1)
    model(tokens, positions, causal_attention_mask(12), labels=tokens).mean().backward()
    router = model.decoder.layers[0].mlp.router
    return {"logits": logits, "query_grad": router.query_weight.grad.abs().sum().item(), "keys_grad": router.keys.grad.abs().sum().item()}


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_ranks")
    dense = make_dense_qwen2(str(root / "dense"), num_heads=8, num_kv_heads=4, seed=5)
    calib = root / "calib.txt"
    calib.write_text(" ".join(SAMPLE_TEXT))
    moe = MoESettings(router="mor", num_experts=4, topk=2, num_routers=8)
    checkpoint = upcycle(dense, str(root / "moe"), moe, CalibrationSettings(files=[str(calib)], tokens=256, seq_length=32),
                         dtype="fp32", progress=False)
    return dense, checkpoint


# Training with TP and MoE needs sequence parallelism, which megatron-core's torch norms (no Apex,
# no Transformer Engine) refuse; on CPU TP is checked in inference, EP in training.
@pytest.mark.parametrize("parallel,backward", [
    ({"tensor_model_parallel_size": 2}, False),
    ({"expert_model_parallel_size": 2}, True),
], ids=["tp2", "ep2"])
def test_two_ranks_load_any_layout_and_match_dense(upcycled, parallel, backward):
    from transformers import AutoModelForCausalLM

    dense_dir, checkpoint = upcycled
    results = run_distributed(_logits_on_ranks, 2, checkpoint, parallel, backward)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    tokens, _ = tokens_and_positions(batch=2, seq=12, seed=3)
    with torch.no_grad():
        expected = dense(tokens).logits
    for result in results:
        torch.testing.assert_close(result["logits"], expected, atol=1e-4, rtol=0)
        if backward:
            assert result["query_grad"] > 0 and result["keys_grad"] > 0, result


def test_locmoe_router_has_no_parameters_and_gates_with_grap():
    model = build(MoESettings(router="locmoe", num_experts=4, topk=2))
    router = model.decoder.layers[0].mlp.router
    assert router.weight is None and router.bias is None and not list(router.parameters())
    assert not any(".router." in key for key in model.sharded_state_dict())
    x = torch.randn(5, 3, 64)
    torch.testing.assert_close(router.gating(x), grap_expert_logits(x.reshape(-1, 64), 4).view(5, 3, 4))
    tokens, positions = tokens_and_positions()
    model(tokens, positions, causal_attention_mask(16), labels=tokens).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def locality_gradient_closed_form(x: torch.Tensor, num_experts: int) -> torch.Tensor:
    """d KL(mean_t softmax(z_t) || uniform) / dx for z = ReLU(group means of x [T, d]), written out: [T, d].

    With p_t = softmax(z_t), pbar = mean_t p_t, a_i = log(N pbar_i) + 1 (dKL/dpbar_i):
    dKL/dz_ti = p_ti (a_i - sum_j p_tj a_j) / T; dz_ti/dx_tc = [mean_ti > 0] / g for c in group i.
    """
    tokens, hidden = x.shape
    group = hidden // num_experts
    means = x.view(tokens, num_experts, group).mean(-1)
    probs = torch.softmax(means.clamp(min=0), dim=-1)
    a = torch.log(num_experts * probs.mean(0)) + 1
    d_logits = probs * (a - (probs * a).sum(-1, keepdim=True)) / tokens
    return (d_logits * (means > 0) / group).repeat_interleave(group, dim=1)


def test_locmoe_locality_loss_reaches_the_router_input_and_is_logged():
    """Only the locality term is on (no load-balancing loss, no z-loss): the input's gradient is mu times the
    closed-form gradient of KL(mean routing distribution || uniform); the tracker holds the KL per layer."""
    from megatron.core.transformer.moe.moe_layer import get_default_pg_collection
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler, clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker,
    )

    from router_upcycling.mcore.model import router_builder

    moe = MoESettings(router="locmoe", num_experts=4, topk=2)
    build(moe)  # process groups
    router = router_builder(moe, locality_coeff=0.3)(transformer_config(ARCH, moe), pg_collection=get_default_pg_collection())
    router.set_layer_number(2)
    # a scale of our own (conftest's fresh_moe_aux_loss_scale drops it afterwards)
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    clear_aux_losses_tracker()
    # [s, b, d], scaled so that group means (logits) spread the routing distribution well away from uniform
    x = (4 * torch.randn(6, 2, 64, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    probs, routing_map = router(x)
    assert probs.shape == routing_map.shape == (12, 4) and (routing_map.sum(-1) == 2).all()
    probs.backward(torch.zeros_like(probs))  # nothing from the routing weights: the attached term alone
    expected = locality_gradient_closed_form(x.detach().double().reshape(12, 64), 4)
    assert expected.abs().max() > 1e-4  # a real gradient (each entry carries 1 / (T g) = 1 / 192)
    torch.testing.assert_close(x.grad.double().reshape(12, 64), 0.3 * expected, rtol=1e-5, atol=1e-9)
    logged = get_moe_layer_wise_logging_tracker()["locality_loss"]["values"]
    expected_kl = locality_loss(routing_distribution(router.gating(x.detach()).view(12, 4)).mean(0))
    torch.testing.assert_close(logged, torch.tensor([0.0, expected_kl.item()]))
    clear_aux_losses_tracker()
    router.eval()
    with torch.no_grad():
        router(x)
    assert get_moe_layer_wise_logging_tracker()["locality_loss"]["values"].abs().sum() == 0


@pytest.mark.parametrize("router", ["mor", "mlp", "switch", "locmoe"])
def test_routers_take_keywords_newer_megatron_core_passes(router):
    """megatron-core 0.17+ builds routers with `is_mtp_layer=...`; ours must not break at construction."""
    from megatron.core.transformer.moe.moe_layer import get_default_pg_collection

    from router_upcycling.mcore.model import router_builder

    moe = MoESettings(router=router, num_experts=4, topk=2)
    build(moe)  # process groups
    config = transformer_config(ARCH, moe)
    router = router_builder(moe)(config, pg_collection=get_default_pg_collection(), is_mtp_layer=False)
    assert router.config is config
