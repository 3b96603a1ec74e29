"""The Mixture-of-Routers router inside megatron-core's GPTModel, on CPU (gloo), 1 and 2 ranks."""
import pytest
import torch

from distributed import run_distributed
from router_upcycling.convert.upcycle import CalibrationSettings, upcycle
from router_upcycling.mcore.model import MoESettings, build_gpt_model, causal_attention_mask, transformer_config
from router_upcycling.mor import mor_expert_logits
from router_upcycling.testing import SAMPLE_TEXT, make_dense_qwen2, tiny_qwen2_config

HF_CONFIG = tiny_qwen2_config(vocab_size=256, num_heads=8, num_kv_heads=4).to_dict()


def tokens_and_positions(batch=2, seq=16, seed=0):
    tokens = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return tokens, torch.arange(seq)[None].expand(batch, -1)


def build(moe, **kwargs):
    from router_upcycling.mcore.parallel import initialize_distributed

    initialize_distributed(seed=0, **{k: v for k, v in kwargs.items() if k.endswith("parallel_size")})
    config = transformer_config(HF_CONFIG, moe, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001, **kwargs)
    return build_gpt_model(HF_CONFIG, moe, config)


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
    from router_upcycling.mcore.checkpoint import load_model_weights, read_metadata, resolve_iteration_dir
    from router_upcycling.mcore.parallel import initialize_distributed

    initialize_distributed(seed=0, **{k: v for k, v in parallel.items() if k.endswith("parallel_size")})
    metadata = read_metadata(checkpoint)
    moe = MoESettings.from_dict(metadata["moe"])
    # experts start identical, so the LM loss alone gives the router no gradient at step 0: the
    # load-balancing loss does
    config = transformer_config(metadata["hf_config"], moe, perform_initialization=False, moe_aux_loss_coeff=0.01, **parallel)
    model = build_gpt_model(metadata["hf_config"], moe, config)
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


@pytest.mark.parametrize("router", ["mor", "mlp", "switch"])
def test_routers_take_keywords_newer_megatron_core_passes(router):
    """megatron-core 0.17+ builds routers with `is_mtp_layer=...`; ours must not break at construction."""
    from megatron.core.transformer.moe.moe_layer import get_default_pg_collection

    from router_upcycling.mcore.model import router_builder

    moe = MoESettings(router=router, num_experts=4, topk=2)
    build(moe)  # process groups
    config = transformer_config(HF_CONFIG, moe)
    router = router_builder(moe)(config, pg_collection=get_default_pg_collection(), is_mtp_layer=False)
    assert router.config is config
