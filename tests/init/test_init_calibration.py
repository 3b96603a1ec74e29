"""Average attention keys (calibration) on tiny random Qwen2 models."""
import pytest
import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

from router_upcycling.init import (
    average_attention_keys,
    head_keys_from_kv,
    init_routers_from_attention,
    router_weights_from_attention,
)
from router_upcycling.testing import SAMPLE_TEXT, make_dense_qwen2, train_tokenizer
from router_upcycling.text import TextDataError, token_chunks

CALIBRATION_TOKENS = 200
SEQ_LENGTH = 32  # 200 tokens: six full chunks and one of 8


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module", params=[8, 2], ids=["mha", "gqa"])
def dense_model(request, tmp_path_factory, tokenizer):
    folder = make_dense_qwen2(str(tmp_path_factory.mktemp("dense")), tokenizer=tokenizer, num_heads=8, num_kv_heads=request.param)
    return Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def reference_average_keys(model, chunks):
    """Mean over all tokens of k_proj(input_layernorm(h_l)), h_l the input of block l, from output_hidden_states."""
    layers = model.model.layers
    key_sums, num_tokens = [0.0] * len(layers), 0
    with torch.no_grad():
        for chunk in chunks:
            hidden_states = model(torch.tensor([chunk]), output_hidden_states=True).hidden_states
            for index, layer in enumerate(layers):
                keys = layer.self_attn.k_proj(layer.input_layernorm(hidden_states[index]))  # [1, S, H_kv * d_h]
                key_sums[index] = key_sums[index] + keys.double().sum(dim=(0, 1))
            num_tokens += len(chunk)
    kv_heads = model.config.num_key_value_heads
    return torch.stack(key_sums).div(num_tokens).view(len(layers), kv_heads, -1).float()


def test_average_keys_match_direct_computation_and_ignore_batch_size(dense_model):
    model, tokenizer = dense_model
    documents = SAMPLE_TEXT * 10
    results = [
        average_attention_keys(model, tokenizer, documents, CALIBRATION_TOKENS, SEQ_LENGTH, batch_size=batch, progress=False)
        for batch in (1, 2, 3)
    ]
    assert [result.tokens for result in results] == [CALIBRATION_TOKENS] * 3
    averages = [result.keys for result in results]
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    assert averages[0].shape == (layers, kv_heads, 64 // 8) and averages[0].dtype == torch.float32
    assert not averages[0].requires_grad
    torch.testing.assert_close(averages[1], averages[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(averages[2], averages[0], rtol=0, atol=1e-6)
    chunks = list(token_chunks(documents, tokenizer, CALIBRATION_TOKENS, SEQ_LENGTH))
    assert sum(map(len, chunks)) == CALIBRATION_TOKENS and len(chunks[-1]) == CALIBRATION_TOKENS % SEQ_LENGTH
    torch.testing.assert_close(averages[0], reference_average_keys(model, chunks), rtol=0, atol=1e-5)


def test_routers_from_calibrated_model(dense_model):
    model, tokenizer = dense_model
    avg_kv_keys = average_attention_keys(model, tokenizer, SAMPLE_TEXT, 64, 16, progress=False).keys
    routers = init_routers_from_attention(model, avg_kv_keys, num_routers=4, num_experts=8)
    assert len(routers) == model.config.num_hidden_layers
    for layer, (query_weight, keys) in zip(model.model.layers, routers):
        assert query_weight.shape == (4, 16, 64) and keys.shape == (8, 16)
        assert query_weight.dtype == keys.dtype == torch.float32
    expected_query, expected_keys, _ = router_weights_from_attention(
        model.model.layers[1].self_attn.q_proj.weight.detach(), head_keys_from_kv(avg_kv_keys[1], 8), 8, 4, 8
    )
    assert torch.equal(routers[1][0], expected_query) and torch.equal(routers[1][1], expected_keys)


def test_calibration_reports_the_tokens_used_when_the_text_runs_out(dense_model, caplog):
    model, tokenizer = dense_model
    available = sum(map(len, token_chunks(SAMPLE_TEXT, tokenizer, 10**9, 16)))
    result = average_attention_keys(model, tokenizer, SAMPLE_TEXT, available + 1000, 16, progress=False)
    assert result.tokens == available and f"calibration used {available} tokens" in caplog.text
    exact = average_attention_keys(model, tokenizer, SAMPLE_TEXT, available, 16, progress=False)
    torch.testing.assert_close(result.keys, exact.keys, rtol=0, atol=0)


def test_calibration_restores_training_mode(dense_model):
    model, tokenizer = dense_model
    model.train()
    average_attention_keys(model, tokenizer, SAMPLE_TEXT, 16, 8, progress=False)
    assert model.training
    model.eval()


def test_calibration_without_tokens_is_an_error(dense_model):
    model, tokenizer = dense_model
    with pytest.raises(TextDataError):
        average_attention_keys(model, tokenizer, [], 16, 8, progress=False)


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory, tokenizer):
    from transformers import Qwen3ForCausalLM

    from router_upcycling.testing import Geometry, make_dense_model

    folder = make_dense_model(str(tmp_path_factory.mktemp("qwen3")), Geometry("qwen3", 64, 8, 2, 16, tied=True),
                              tokenizer=tokenizer, seed=4)
    return Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def test_qk_norm_keys_after_the_norm_are_the_mean_of_k_norm_outputs(qwen3_model):
    """after_key_norm: mean over tokens of k_norm(k_proj(x)) per KV head, written out; not the norm of the mean."""
    model, tokenizer = qwen3_model
    documents = SAMPLE_TEXT * 10
    chunks = list(token_chunks(documents, tokenizer, CALIBRATION_TOKENS, SEQ_LENGTH))
    after = average_attention_keys(model, tokenizer, documents, CALIBRATION_TOKENS, SEQ_LENGTH, progress=False,
                                   after_norm=True).keys
    before = average_attention_keys(model, tokenizer, documents, CALIBRATION_TOKENS, SEQ_LENGTH, progress=False).keys
    layers = model.model.layers
    sums, num_tokens = [0.0] * len(layers), 0
    with torch.no_grad():
        for chunk in chunks:
            hidden_states = model(torch.tensor([chunk]), output_hidden_states=True).hidden_states
            for index, layer in enumerate(layers):
                keys = layer.self_attn.k_proj(layer.input_layernorm(hidden_states[index])).view(1, len(chunk), 2, 16)
                sums[index] = sums[index] + layer.self_attn.k_norm(keys).double().sum(dim=(0, 1))
            num_tokens += len(chunk)
    torch.testing.assert_close(after, (torch.stack(sums) / num_tokens).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(before, reference_average_keys(model, chunks), rtol=1e-5, atol=1e-6)
    normed_mean = layers[0].self_attn.k_norm(before[0])  # the norm of the mean key differs from the mean normed key
    assert (normed_mean - after[0]).abs().max() > 1e-3


def test_folding_the_query_norm_scales_every_head_by_its_weight(qwen3_model):
    model, _ = qwen3_model
    keys = torch.randn(model.config.num_hidden_layers, 2, 16)
    raw = init_routers_from_attention(model, keys, num_routers=8, num_experts=8)
    folded = init_routers_from_attention(model, keys, num_routers=8, num_experts=8, fold_query_norm=True)
    gain = model.model.layers[0].self_attn.q_norm.weight.detach()  # [d_h]: one router per head here
    torch.testing.assert_close(folded[0][0], raw[0][0] * gain[None, :, None], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(folded[0][1], raw[0][1])  # the keys are the keys given


def test_average_queries_are_q_proj_of_the_mean_input_per_query_head(dense_model):
    """projection "q": mean over tokens of q_proj(x_t) (bias included), one per query head, written out."""
    model, tokenizer = dense_model
    documents = SAMPLE_TEXT * 10
    chunks = list(token_chunks(documents, tokenizer, CALIBRATION_TOKENS, SEQ_LENGTH))
    queries = average_attention_keys(model, tokenizer, documents, CALIBRATION_TOKENS, SEQ_LENGTH, progress=False,
                                     projection="q").keys
    layers = model.model.layers
    sums, num_tokens = [0.0] * len(layers), 0
    with torch.no_grad():
        for chunk in chunks:
            hidden_states = model(torch.tensor([chunk]), output_hidden_states=True).hidden_states
            for index, layer in enumerate(layers):
                sums[index] = sums[index] + layer.self_attn.q_proj(layer.input_layernorm(hidden_states[index])).double().sum(dim=(0, 1))
            num_tokens += len(chunk)
    assert queries.shape == (len(layers), model.config.num_attention_heads, 8)
    torch.testing.assert_close(queries, (torch.stack(sums) / num_tokens).view(len(layers), 8, 8).float(), rtol=1e-5, atol=1e-6)
