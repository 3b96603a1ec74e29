"""The Megatron-LM flags of our checkpoints (`megatron-args`), the `args` namespace our checkpoints carry, and the
check that names a flag disagreeing with the checkpoint."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lm_runs import has_training_layer, needs_training_layer
from router_upcycling.megatron_lm.flags import checkpoint_args, format_flags, megatron_flags, mismatched_flags
from router_upcycling.settings.architecture import Architecture
from router_upcycling.settings.moe import MoESettings

QWEN2 = Architecture(family="qwen2", num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=2, head_dim=8,
                     ffn_hidden_size=96, vocab_size=512, max_position_embeddings=256, tie_embeddings=True,
                     qkv_bias=True, qk_norm=False, norm_eps=1e-6, rope_theta=1000000.0)
LLAMA3 = Architecture(family="llama", num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=2, head_dim=8,
                      ffn_hidden_size=96, vocab_size=512, max_position_embeddings=131072, tie_embeddings=False,
                      qkv_bias=False, qk_norm=False, norm_eps=1e-5, rope_theta=500000.0, rope_scaling_factor=32.0)
REPO_ROOT = Path(__file__).resolve().parents[2]
MOR = MoESettings(router="mor", num_experts=4, topk=2, num_routers=4)
QWEN2_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 64,
                "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 96,
                "vocab_size": 512, "max_position_embeddings": 256, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "hidden_act": "silu"}  # QWEN2's, as a checkpoint's metadata holds it


def options(argv):
    return {part for part in argv if part.startswith("--")}


def test_flags_follow_the_architecture():
    qwen2 = megatron_flags(QWEN2, MOR)
    assert {"--add-qkv-bias", "--group-query-attention", "--swiglu", "--disable-bias-linear"} <= options(qwen2)
    assert not {"--qk-layernorm", "--untie-embeddings-and-output-weights", "--use-rope-scaling"} & options(qwen2)
    assert qwen2[qwen2.index("--num-query-groups") + 1] == "2" and qwen2[qwen2.index("--rotary-base") + 1] == "1000000"
    assert qwen2[-3:] == ["--spec", "router_upcycling.megatron_lm.spec", "layer_spec"]
    llama = megatron_flags(LLAMA3, MoESettings(router="switch", num_experts=4))
    assert {"--use-rope-scaling", "--untie-embeddings-and-output-weights", "--moe-router-pre-softmax"} <= options(llama)
    assert llama[llama.index("--rope-scaling-factor") + 1] == "32.0" and llama[llama.index("--moe-router-topk") + 1] == "1"
    text = format_flags(qwen2)
    assert text.splitlines()[0] == "--num-layers 2 \\" and "--spec router_upcycling.megatron_lm.spec layer_spec" in text


def test_the_checkpoint_namespace_describes_itself_and_names_what_differs():
    saved = checkpoint_args(QWEN2, MOR, tensor=2, data=4, consumed_train_samples=96)
    assert (saved.tensor_model_parallel_size, saved.data_parallel_size, saved.world_size) == (2, 4, 8)
    assert saved.consumed_train_samples == 96 and saved.num_query_groups == 2 and saved.padded_vocab_size == 512
    assert mismatched_flags(saved, QWEN2, MOR) == []
    wrong = argparse.Namespace(**{**vars(saved), "add_qkv_bias": False, "num_query_groups": 8})
    problems = mismatched_flags(wrong, QWEN2, MOR)
    assert len(problems) == 2
    assert problems[0].startswith("--num-query-groups 2") and "not 8" in problems[0]
    assert problems[1].startswith("--add-qkv-bias is needed")


@needs_training_layer
def test_megatron_lm_arguments_missing_a_flag_are_named():
    """What a user's own pretrain_gpt.py parses, checked by our --spec before any layer is built."""
    from megatron.training.arguments import parse_args

    argv = [part for part in megatron_flags(QWEN2, MOR) if part != "--add-qkv-bias"]
    old_argv, sys.argv = sys.argv, ["pretrain_gpt.py", *argv]
    try:
        args = parse_args()
    finally:
        sys.argv = old_argv
    assert [p.split(":")[0] for p in mismatched_flags(args, QWEN2, MOR)] == ["--add-qkv-bias is needed"]


def test_megatron_args_prints_a_checkpoints_flags(tmp_path):
    from router_upcycling.checkpoint_folder import write_metadata

    write_metadata(str(tmp_path), {"hf_config": QWEN2_CONFIG, "moe": MOR.to_dict(QWEN2)})
    tool = [sys.executable, str(REPO_ROOT / "tools" / "convert_checkpoint.py"), "megatron-args", "--checkpoint"]
    printed = subprocess.run([*tool, str(tmp_path)], capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr
    assert [part for part in printed.stdout.split() if part != "\\"] == megatron_flags(QWEN2, MOR)
    missing = subprocess.run([*tool, str(tmp_path / "absent")], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "not found" in missing.stderr


@pytest.mark.skipif(has_training_layer(), reason="megatron-core 0.16 only: there the launcher says what it needs")
def test_the_launcher_says_what_it_needs_without_megatron_training():
    result = subprocess.run([sys.executable, "-m", "router_upcycling.megatron_lm", "--help"], capture_output=True,
                            text=True, cwd=str(REPO_ROOT))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "megatron.training" in result.stderr and "megatron-core 0.16" in result.stderr


@needs_training_layer
def test_the_spec_builds_our_router_and_refuses_a_flag_that_disagrees(tmp_path):
    """What Megatron-LM's GPT builder calls with --spec router_upcycling.megatron_lm.spec layer_spec."""
    from megatron.training import global_vars
    from megatron.training.arguments import parse_args

    from router_upcycling.errors import UserError
    from router_upcycling.mcore.model import transformer_config
    from router_upcycling.mcore.routers import MixtureOfRoutersRouter
    from router_upcycling.megatron_lm.spec import layer_spec
    from router_upcycling.mcore.compat import moe_submodules
    from router_upcycling.checkpoint_folder import write_metadata

    write_metadata(str(tmp_path), {"hf_config": QWEN2_CONFIG, "moe": MOR.to_dict(QWEN2)})
    from router_upcycling.mcore.parallel import initialize_distributed

    initialize_distributed()  # one rank: the spec asks the pipeline group how many layers this stage builds

    def spec_for(argv):
        old_argv, sys.argv = sys.argv, ["pretrain_gpt.py", *argv, "--load", str(tmp_path), "--transformer-impl", "local"]
        try:
            global_vars.set_args(parse_args())
        finally:
            sys.argv = old_argv
        return layer_spec(transformer_config(QWEN2, MOR))

    block = spec_for(megatron_flags(QWEN2, MOR))
    router = moe_submodules(block.layer_specs[0]).router
    assert len(block.layer_specs) == 2 and getattr(router, "func", router) is MixtureOfRoutersRouter
    with pytest.raises(UserError, match="--add-qkv-bias is needed"):
        spec_for([part for part in megatron_flags(QWEN2, MOR) if part != "--add-qkv-bias"])
