"""The typed architecture: read from a dense config.json by its family, refused in one line when unsupported, and
the same object whether it comes from the HF folder or back from a checkpoint's metadata."""
import json

import pytest

from router_upcycling.settings.architecture import Architecture, ArchitectureError, read_dense_model
from router_upcycling.settings.families import QWEN2, family_of
from router_upcycling.testing import tiny_qwen2_config


def qwen2(**changes) -> dict:
    return {**tiny_qwen2_config(num_heads=8, num_kv_heads=2).to_dict(), "architectures": ["Qwen2ForCausalLM"], **changes}


def test_qwen2_config_reads_as_its_facts():
    arch = Architecture.from_hf_config(qwen2())
    assert (arch.family, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.query_width) == ("qwen2", 8, 2, 8, 64)
    assert arch.qkv_bias and not arch.qk_norm and arch.tie_embeddings and arch.heads_per_kv_group == 4
    assert arch.rope_theta == 10000.0 and arch.norm_eps == 1e-6 and arch.ffn_hidden_size == 96


def test_explicit_head_dim_need_not_be_hidden_over_heads():
    assert Architecture.from_hf_config(qwen2(head_dim=32)).query_width == 8 * 32


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported architecture GPT2LMHeadModel; supported: Qwen2ForCausalLM"),
    ({"architectures": ["Qwen2ForSequenceClassification"]}, "unsupported architecture Qwen2ForSequenceClassification"),
    ({"use_sliding_window": True}, "sliding-window attention"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "RoPE scaling 'yarn' is not supported"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    ({"num_attention_heads": 7}, "7 attention heads cannot share 2 key/value heads"),
])
def test_unsupported_configs_are_one_line_errors(change, message):
    with pytest.raises(ArchitectureError, match=message):
        Architecture.from_hf_config(qwen2(**change))


def test_a_config_without_a_required_key_names_it():
    config = qwen2()
    del config["num_hidden_layers"]
    with pytest.raises(ArchitectureError, match="lacks num_hidden_layers"):
        Architecture.from_hf_config(config)


def test_model_folders_that_are_not_folders_or_hold_no_object(tmp_path):
    with pytest.raises(ArchitectureError, match="model folder not found"):
        read_dense_model(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArchitectureError, match="is a file"):
        read_dense_model(str(tmp_path / "file"))
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[]")
    with pytest.raises(ArchitectureError, match="must hold a JSON object"):
        read_dense_model(str(tmp_path / "list"))


def test_the_family_holds_the_weight_table_and_the_stock_target():
    family = family_of(qwen2())
    assert family is QWEN2 and family.stock.architecture == "Qwen2MoeForCausalLM"
    tied = Architecture.from_hf_config(qwen2())
    untied = Architecture.from_hf_config(qwen2(tie_word_embeddings=False))
    assert "lm_head.weight" not in family.dense_tensor_names(tied) and "lm_head.weight" in family.dense_tensor_names(untied)
    assert "model.layers.1.self_attn.k_proj.bias" in family.dense_tensor_names(tied)
    fields = family.mcore_config_fields(tied)
    assert (fields["num_query_groups"], fields["kv_channels"], fields["add_qkv_bias"]) == (2, 8, True)


def test_metadata_round_trip_gives_the_same_architecture(tmp_path):
    config = qwen2()
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, from_folder = read_dense_model(str(tmp_path))
    assert Architecture.from_hf_config(json.loads(json.dumps(config))) == from_folder


def qwen3(**changes) -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "num_attention_heads": 16,
            "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 2, "intermediate_size": 3072,
            "vocab_size": 151936, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, **changes}


def llama(**changes) -> dict:
    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "num_hidden_layers": 2, "intermediate_size": 8192,
            "vocab_size": 128256, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "attention_bias": False,
            "mlp_bias": False, "pretraining_tp": 1, "rope_parameters": rope, **changes}


def test_qwen3_has_qk_norm_no_bias_and_its_own_head_dim():
    arch = Architecture.from_hf_config(qwen3())
    assert (arch.family, arch.qk_norm, arch.qkv_bias, arch.head_dim, arch.query_width) == ("qwen3", True, False, 128, 2048)
    without = qwen3()
    del without["head_dim"]
    assert Architecture.from_hf_config(without).head_dim == 128  # Qwen3Config's default, not hidden / heads = 64


def test_llama3_rope_scaling_is_read_as_megatron_core_computes_it():
    arch = Architecture.from_hf_config(llama())
    assert (arch.family, arch.rope_scaling_factor, arch.rope_theta, arch.qkv_bias) == ("llama", 32.0, 500000.0, False)
    assert Architecture.from_hf_config(llama(rope_parameters={"rope_type": "default", "rope_theta": 5e5})).rope_scaling_factor is None


@pytest.mark.parametrize("config, message", [
    (qwen3(use_sliding_window=True), "sliding-window attention"),
    (qwen3(layer_types=["full_attention", "sliding_attention"]), "sliding-window attention"),
    (qwen3(attention_bias=True), "attention biases"),
    (qwen3(hidden_act="gelu"), "activation 'gelu' is not supported"),
    (qwen3(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), "RoPE scaling 'yarn'"),
    (llama(mlp_bias=True), r"FFN biases \(mlp_bias: true\)"),
    (llama(attention_bias=True), "attention biases"),
    (llama(pretraining_tp=2), "pretraining_tp 2 is not supported"),
    (llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e5}), "RoPE scaling 'dynamic'"),
    (llama(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_theta": 5e5}),
     "low_freq_factor 2.0 is not supported: megatron-core computes it with low_freq_factor 1"),
])
def test_what_a_family_cannot_convert_is_one_line(config, message):
    with pytest.raises(ArchitectureError, match=message):
        Architecture.from_hf_config(config)


def test_each_family_names_its_stock_moe_and_weight_table():
    for config, stock, qk_norm_tensor in ((qwen2(), "Qwen2MoeForCausalLM", False), (qwen3(), "Qwen3MoeForCausalLM", True),
                                          (llama(), "MixtralForCausalLM", False)):
        family, arch = family_of(config), Architecture.from_hf_config(config)
        names = family.dense_tensor_names(arch)
        assert family.stock.architecture == stock
        assert ("model.layers.0.self_attn.q_norm.weight" in names) == qk_norm_tensor
        assert ("model.layers.0.self_attn.q_proj.bias" in names) == arch.qkv_bias
