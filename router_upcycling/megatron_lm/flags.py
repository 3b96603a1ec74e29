"""Megatron-LM's flags for one of our checkpoints, and the `args` namespace Megatron-LM keeps in a checkpoint.

One table maps each Megatron-LM argument (its `args` attribute and its flag) to the value our architecture and MoE
settings give it. The same table
- prints the flags (`tools/convert_checkpoint.py megatron-args`, `upcycle`),
- writes the namespace our checkpoints carry as Megatron-LM's common state `args` (so `--use-checkpoint-args` and
  Megatron-LM's own checks see the architecture), and
- names the flag a run got wrong (the launcher and the `--spec` refuse it before any weight is read).

Pure: imports no megatron package (the flags print on any install).
"""
import argparse
from dataclasses import dataclass
from typing import Callable, List, Optional

from router_upcycling.settings.architecture import Architecture
from router_upcycling.settings.moe import MoESettings

SPEC = ["router_upcycling.megatron_lm.spec", "layer_spec"]  # --spec MODULE NAME


@dataclass(frozen=True)
class Flag:
    """One Megatron-LM argument: `dest` its args attribute, `flag` its option; `value` what our settings give it;
    `switch`: a store_true flag (passed when the value is True), `negated`: a store_false one (passed when False)."""

    dest: str
    flag: str
    value: Callable[[Architecture, MoESettings], object]
    switch: bool = False
    negated: bool = False
    why: str = ""
    only_if: Optional[Callable[[Architecture, MoESettings], bool]] = None  # printed only when this holds

    def argv(self, arch: Architecture, moe: MoESettings) -> List[str]:
        if self.only_if is not None and not self.only_if(arch, moe):
            return []
        value = self.value(arch, moe)
        if self.switch:
            return [self.flag] if value else []
        if self.negated:
            return [] if value else [self.flag]
        return [self.flag, format_value(value)]


def format_value(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


ARCHITECTURE_FLAGS = [
    Flag("num_layers", "--num-layers", lambda a, m: a.num_layers),
    Flag("hidden_size", "--hidden-size", lambda a, m: a.hidden_size),
    Flag("ffn_hidden_size", "--ffn-hidden-size", lambda a, m: a.ffn_hidden_size),
    Flag("num_attention_heads", "--num-attention-heads", lambda a, m: a.num_heads),
    Flag("group_query_attention", "--group-query-attention", lambda a, m: True, switch=True),
    Flag("num_query_groups", "--num-query-groups", lambda a, m: a.num_kv_heads, why="key/value heads"),
    Flag("kv_channels", "--kv-channels", lambda a, m: a.head_dim, why="the head dimension"),
    Flag("max_position_embeddings", "--max-position-embeddings", lambda a, m: a.max_position_embeddings),
    Flag("position_embedding_type", "--position-embedding-type", lambda a, m: "rope"),
    Flag("rotary_base", "--rotary-base", lambda a, m: int(a.rope_theta)),
    Flag("rotary_percent", "--rotary-percent", lambda a, m: 1.0),
    Flag("use_rope_scaling", "--use-rope-scaling", lambda a, m: a.rope_scaling_factor is not None, switch=True,
         why="Llama 3's RoPE frequency scaling"),
    Flag("rope_scaling_factor", "--rope-scaling-factor", lambda a, m: a.rope_scaling_factor or 8.0,
         only_if=lambda a, m: a.rope_scaling_factor is not None),
    Flag("normalization", "--normalization", lambda a, m: "RMSNorm"),
    Flag("layernorm_epsilon", "--norm-epsilon", lambda a, m: a.norm_eps),
    Flag("swiglu", "--swiglu", lambda a, m: True, switch=True),
    Flag("add_bias_linear", "--disable-bias-linear", lambda a, m: False, negated=True),
    Flag("add_qkv_bias", "--add-qkv-bias", lambda a, m: a.qkv_bias, switch=True, why="query/key/value biases"),
    Flag("qk_layernorm", "--qk-layernorm", lambda a, m: a.qk_norm, switch=True, why="query/key norms"),
    Flag("untie_embeddings_and_output_weights", "--untie-embeddings-and-output-weights",
         lambda a, m: not a.tie_embeddings, switch=True, why="an output layer of its own"),
    Flag("padded_vocab_size", "--padded-vocab-size", lambda a, m: a.vocab_size, why="embedding rows"),
    Flag("hidden_dropout", "--hidden-dropout", lambda a, m: 0.0),
    Flag("attention_dropout", "--attention-dropout", lambda a, m: 0.0),
]
MOE_FLAGS = [
    Flag("num_experts", "--num-experts", lambda a, m: m.num_experts),
    Flag("moe_ffn_hidden_size", "--moe-ffn-hidden-size", lambda a, m: a.ffn_hidden_size),
    Flag("moe_router_topk", "--moe-router-topk", lambda a, m: m.topk),
    # softmax over the chosen logits keeps the upcycled model equal to the dense one (top-1 needs pre-softmax)
    Flag("moe_router_pre_softmax", "--moe-router-pre-softmax", lambda a, m: m.topk == 1, switch=True),
    Flag("moe_router_load_balancing_type", "--moe-router-load-balancing-type", lambda a, m: "aux_loss"),
    Flag("moe_router_dtype", "--moe-router-dtype", lambda a, m: "fp32"),
]
FLAGS = ARCHITECTURE_FLAGS + MOE_FLAGS
# the values that decide which weights exist and what they mean: a wrong one is refused, never loaded
CHECKED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
           "position_embedding_type", "rotary_base", "use_rope_scaling", "rope_scaling_factor", "normalization",
           "layernorm_epsilon", "swiglu", "add_bias_linear", "add_qkv_bias", "qk_layernorm",
           "untie_embeddings_and_output_weights", "padded_vocab_size", "num_experts", "moe_ffn_hidden_size",
           "moe_router_topk", "moe_router_pre_softmax")


def megatron_flags(arch: Architecture, moe: MoESettings) -> List[str]:
    """Megatron-LM's command-line flags of the architecture and the MoE (the router comes with the --spec)."""
    argv = [part for flag in FLAGS for part in flag.argv(arch, moe)]
    return argv + ["--spec", *SPEC]


def format_flags(argv: List[str]) -> str:
    """The flags as a shell continuation, one flag with its value per line."""
    lines, current = [], []
    for part in argv:
        if part.startswith("--") and current:
            lines.append(" ".join(current))
            current = []
        current.append(part)
    lines.append(" ".join(current))
    return " \\\n".join(lines)


def checkpoint_args(arch: Architecture, moe: MoESettings, *, tensor: int = 1, pipeline: int = 1, expert: int = 1,
                    data: int = 1, consumed_train_samples: int = 0, **extra) -> argparse.Namespace:
    """The `args` namespace Megatron-LM saves in a checkpoint's common state, for our checkpoint: every table value
    (read by --use-checkpoint-args and by Megatron-LM's argument checks), the parallel sizes and the data position."""
    values = {flag.dest: flag.value(arch, moe) for flag in FLAGS}
    values.update(spec=list(SPEC), tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
                  expert_model_parallel_size=expert, data_parallel_size=data,
                  world_size=tensor * pipeline * data, consumed_train_samples=consumed_train_samples,
                  consumed_valid_samples=0, ckpt_format="torch_dist", **extra)
    return argparse.Namespace(**values)


def effective(args, dest: str):
    """What a parsed Megatron-LM namespace means for `dest` (it keeps num_query_groups apart from the heads unless
    --group-query-attention is given)."""
    if dest == "num_query_groups" and not getattr(args, "group_query_attention", False):
        return getattr(args, "num_attention_heads", None)
    if dest == "moe_ffn_hidden_size" and getattr(args, dest, None) is None:
        return getattr(args, "ffn_hidden_size", None)
    if dest in ("use_rope_scaling", "rope_scaling_factor") and not getattr(args, "use_rope_scaling", False):
        return False if dest == "use_rope_scaling" else None
    return getattr(args, dest, None)


def mismatched_flags(args, arch: Architecture, moe: MoESettings) -> List[str]:
    """One phrase per checked argument whose value in `args` (a parsed Megatron-LM namespace) differs from the
    checkpoint's, naming the flag and what the checkpoint needs."""
    problems = []
    for flag in FLAGS:
        if flag.dest not in CHECKED:
            continue
        wanted = flag.value(arch, moe)
        if flag.dest == "rope_scaling_factor" and arch.rope_scaling_factor is None:
            wanted = None
        given = effective(args, flag.dest)
        if given == wanted or (isinstance(wanted, float) and isinstance(given, (int, float)) and float(given) == wanted):
            continue
        problems.append(describe(flag, wanted, given))
    return problems


def describe(flag: Flag, wanted, given) -> str:
    what = f" ({flag.why})" if flag.why else ""
    if flag.switch:
        return f"{flag.flag} {'is needed' if wanted else 'must be left out'}: the checkpoint's model has " \
               f"{'' if wanted else 'no '}{flag.why or flag.dest.replace('_', ' ')}"
    if flag.negated:
        return f"{flag.flag} {'must be left out' if wanted else 'is needed'}{what}"
    return f"{flag.flag} {format_value(wanted)}{what}, not {format_value(given)}"


def refusal(problems: List[str], checkpoint: Optional[str]) -> str:
    where = f" {checkpoint}" if checkpoint else ""
    return (f"the flags do not describe the checkpoint{where}: " + "; ".join(problems) +
            " (tools/convert_checkpoint.py megatron-args --checkpoint DIR prints its flags)")
