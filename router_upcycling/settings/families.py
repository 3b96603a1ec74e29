"""Model families: for each, how its config.json reads as an Architecture, what it refuses, its weight names
against megatron-core's, its megatron-core configuration, and the stock Hugging Face MoE it exports to.

A family is found from a config's `architectures` / `model_type`, never from a model's name. Pure Python.

Weight tables: one WeightRule per megatron-core tensor, with `{layer}` / `{expert}` placeholders. Megatron
names are the local layer spec's at TP = PP = EP = 1 (`model.state_dict()`); `hf` lists the dense Hugging
Face tensors it is made of, `transform` names the small function in router_upcycling.convert.mapping that
joins them (and splits them on the way back); `applies` says for which architectures the tensor exists.
"""
import dataclasses
from typing import Callable, Dict, Optional, Tuple

from router_upcycling.settings.architecture import Architecture, ArchitectureError


def _always(arch: Architecture) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class WeightRule:
    mcore: str
    hf: Tuple[str, ...]
    transform: str = "copy"  # copy | qkv | gate_up
    applies: Callable[[Architecture], bool] = _always

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.mcore


@dataclasses.dataclass(frozen=True)
class StockMoE:
    """A stock transformers MoE architecture an upcycled model exports to (`export --format stock`).

    Tensor names are the on-disk layout of published checkpoints of that architecture, relative to
    `model.layers.{layer}.` + `block`: the gate [N, d], and per expert gate/up/down projections.
    `zero_tensors(d)`: tensors the architecture loads that an upcycled model has no use for (name -> shape), written
    as zeros so loading reports nothing missing.
    """

    format: str
    display: str
    architecture: str
    config_class: str
    block: str
    gate: str
    expert_gate: str
    expert_up: str
    expert_down: str
    config_fields: Callable[[Architecture, int, int], dict]  # (arch, experts, top-k) -> fields over the dense config
    zero_tensors: Callable[[int], Dict[str, Tuple[int, ...]]] = lambda hidden: {}


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    display: str  # as the model card names it
    checkpoints: str  # the published models it covers, for messages and docs
    hf_architectures: Tuple[str, ...]
    model_types: Tuple[str, ...]
    dense_rules: Tuple[WeightRule, ...]
    expert_rules: Tuple[WeightRule, ...]
    stock: StockMoE
    mor_prefix: str  # the family's classes in the `mor` format's code: {prefix}MoRConfig, {prefix}MoRForCausalLM
    refusals: Callable[[dict], Optional[str]]  # why a config of this family is not supported, or None
    qkv_bias: Callable[[dict], bool]
    qk_norm: bool
    default_head_dim: Optional[int] = None  # head_dim when config.json leaves it out (None: hidden size / heads)

    def matches(self, config: dict) -> bool:
        """The config's model_type is this family's, and so is its class when it names one (configs built in code
        and never saved from a model have no `architectures`)."""
        architectures = set(config.get("architectures") or [])
        return config.get("model_type") in self.model_types and (not architectures or bool(architectures & set(self.hf_architectures)))

    def architecture(self, config: dict) -> Architecture:
        refusal = self.refusals(config)
        if refusal:
            raise ArchitectureError(refusal)
        missing = [key for key in REQUIRED_KEYS if key not in config]
        if missing:
            raise ArchitectureError(f"config.json lacks {', '.join(missing)}, which every {self.hf_architectures[0]} "
                                    "config has")
        try:
            heads = _positive(config, "num_attention_heads")
            hidden = _positive(config, "hidden_size")
            kv_heads = _positive(config, "num_key_value_heads") if config.get("num_key_value_heads") else heads
            arch = Architecture(
                family=self.name,
                num_layers=_positive(config, "num_hidden_layers"),
                hidden_size=hidden,
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=_positive(config, "head_dim") if config.get("head_dim") else (self.default_head_dim or hidden // heads),
                ffn_hidden_size=_positive(config, "intermediate_size"),
                vocab_size=_positive(config, "vocab_size"),
                max_position_embeddings=int(config.get("max_position_embeddings") or 4096),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=self.qkv_bias(config),
                qk_norm=self.qk_norm,
                norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta(config),
                rope_scaling_factor=llama3_rope_factor(config),
            )
        except (TypeError, ValueError) as err:
            raise ArchitectureError(f"config.json: {err}") from None
        if heads % kv_heads:
            raise ArchitectureError(f"config.json: {heads} attention heads cannot share {kv_heads} key/value heads evenly")
        return arch

    def weight_rules(self, arch: Architecture) -> Tuple[WeightRule, ...]:
        """The non-expert tensors this architecture has."""
        return tuple(rule for rule in self.dense_rules if rule.applies(arch))

    def dense_tensor_names(self, arch: Architecture) -> list:
        """Every tensor name a dense checkpoint of this architecture must hold."""
        names = []
        for rule in self.weight_rules(arch) + self.expert_rules:
            layers = range(arch.num_layers) if rule.per_layer else [None]
            names += [name.format(layer=layer) for layer in layers for name in rule.hf]
        return sorted(set(names))

    def mcore_config_fields(self, arch: Architecture) -> dict:
        """megatron-core TransformerConfig fields of the architecture (activation by name: the glue maps it)."""
        return {
            "num_layers": arch.num_layers, "hidden_size": arch.hidden_size, "num_attention_heads": arch.num_heads,
            "num_query_groups": arch.num_kv_heads, "kv_channels": arch.head_dim, "ffn_hidden_size": arch.ffn_hidden_size,
            "normalization": "RMSNorm", "layernorm_epsilon": arch.norm_eps, "add_bias_linear": False,
            "add_qkv_bias": arch.qkv_bias, "qk_layernorm": arch.qk_norm, "gated_linear_unit": True, "activation": "silu",
        }


REQUIRED_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")


def _positive(config: dict, key: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def rope_theta(config: dict) -> float:
    # transformers 5 keeps it in rope_parameters; older configs at the top level
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def rope_parameters(config: dict) -> dict:
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def rope_type(config: dict) -> str:
    params = rope_parameters(config)
    return params.get("rope_type", params.get("type", "default")) or "default"


# megatron-core computes Llama 3's frequency scaling with these fixed (GPTModel(rope_scaling=True, rope_scaling_factor=F))
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama3_rope_factor(config: dict) -> Optional[float]:
    return float(rope_parameters(config)["factor"]) if rope_type(config) == "llama3" else None


def _common_refusals(config: dict, rope_types=("default",)) -> Optional[str]:
    """What no family here converts: another activation, sliding-window layers, RoPE scalings megatron-core lacks."""
    if config.get("hidden_act", "silu") != "silu":
        return f"activation {config['hidden_act']!r} is not supported; the FFN must be SwiGLU (hidden_act: silu)"
    if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or []):
        return "sliding-window attention (use_sliding_window: true) is not supported"
    kind = rope_type(config)
    if kind not in rope_types:
        supported = " or ".join(repr(t) for t in rope_types)
        return f"RoPE scaling {kind!r} is not supported; only {supported} rotary embeddings"
    return None


# ---------------------------------------------------------------- Qwen2 (Qwen1.5, Qwen2, Qwen2.5)

_LAYER = "model.layers.{layer}."
_MCORE_LAYER = "decoder.layers.{layer}."


def _untied(arch: Architecture) -> bool:
    return not arch.tie_embeddings


def _has_qkv_bias(arch: Architecture) -> bool:
    return arch.qkv_bias


def _has_qk_norm(arch: Architecture) -> bool:
    return arch.qk_norm


LLAMA_STYLE_DENSE_RULES = (
    WeightRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    WeightRule(_MCORE_LAYER + "input_layernorm.weight", (_LAYER + "input_layernorm.weight",)),
    WeightRule(_MCORE_LAYER + "self_attention.linear_qkv.weight",
               tuple(f"{_LAYER}self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
    WeightRule(_MCORE_LAYER + "self_attention.linear_qkv.bias",
               tuple(f"{_LAYER}self_attn.{p}_proj.bias" for p in "qkv"), "qkv", _has_qkv_bias),
    # QK-norm (Qwen3): one RMSNorm weight [head_dim] for every head's query, one for every key
    WeightRule(_MCORE_LAYER + "self_attention.q_layernorm.weight", (_LAYER + "self_attn.q_norm.weight",), applies=_has_qk_norm),
    WeightRule(_MCORE_LAYER + "self_attention.k_layernorm.weight", (_LAYER + "self_attn.k_norm.weight",), applies=_has_qk_norm),
    WeightRule(_MCORE_LAYER + "self_attention.linear_proj.weight", (_LAYER + "self_attn.o_proj.weight",)),
    WeightRule(_MCORE_LAYER + "pre_mlp_layernorm.weight", (_LAYER + "post_attention_layernorm.weight",)),
    WeightRule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    WeightRule("output_layer.weight", ("lm_head.weight",), applies=_untied),
)
SWIGLU_EXPERT_RULES = (
    WeightRule(_MCORE_LAYER + "mlp.experts.local_experts.{expert}.linear_fc1.weight",
               (_LAYER + "mlp.gate_proj.weight", _LAYER + "mlp.up_proj.weight"), "gate_up"),
    WeightRule(_MCORE_LAYER + "mlp.experts.local_experts.{expert}.linear_fc2.weight", (_LAYER + "mlp.down_proj.weight",)),
)


def _qwen2_refusals(config: dict) -> Optional[str]:
    return _common_refusals(config)


def _qwen2_moe_fields(arch: Architecture, num_experts: int, topk: int) -> dict:
    # every layer sparse, no shared expert; top-k weights renormalised as megatron-core's softmax over the chosen k
    return {"num_experts": num_experts, "num_experts_per_tok": topk, "moe_intermediate_size": arch.ffn_hidden_size,
            "shared_expert_intermediate_size": 0, "norm_topk_prob": True, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "qkv_bias": arch.qkv_bias}


QWEN2 = Family(
    name="qwen2",
    display="Qwen2",
    mor_prefix="Qwen2",
    checkpoints="Qwen1.5, Qwen2 and Qwen2.5 dense checkpoints",
    hf_architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    dense_rules=LLAMA_STYLE_DENSE_RULES,
    expert_rules=SWIGLU_EXPERT_RULES,
    stock=StockMoE(
        format="qwen2_moe", display="Qwen2-MoE", architecture="Qwen2MoeForCausalLM", config_class="Qwen2MoeConfig", block="mlp.",
        gate="gate.weight", expert_gate="experts.{expert}.gate_proj.weight", expert_up="experts.{expert}.up_proj.weight",
        expert_down="experts.{expert}.down_proj.weight", config_fields=_qwen2_moe_fields,
        # Qwen2-MoE always builds a shared expert: with size 0 and a zero gate its output is zero
        zero_tensors=lambda hidden: {"shared_expert.gate_proj.weight": (0, hidden), "shared_expert.up_proj.weight": (0, hidden),
                                     "shared_expert.down_proj.weight": (hidden, 0), "shared_expert_gate.weight": (1, hidden)},
    ),
    refusals=_qwen2_refusals,
    qkv_bias=lambda config: True,  # transformers' Qwen2 attention always has q/k/v biases
    qk_norm=False,
)

# ---------------------------------------------------------------- Qwen3 (dense)


def _qwen3_refusals(config: dict) -> Optional[str]:
    if config.get("attention_bias"):
        return "attention biases (attention_bias: true) are not supported"
    return _common_refusals(config)


def _moe_fields(arch: Architecture, num_experts: int, topk: int) -> dict:
    # every layer sparse; top-k weights renormalised as megatron-core's softmax over the chosen k (norm_topk_prob:
    # without it Qwen3-MoE weighs the chosen experts by their share of a softmax over all N, not the upcycled model)
    return {"num_experts": num_experts, "num_experts_per_tok": topk, "moe_intermediate_size": arch.ffn_hidden_size,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "head_dim": arch.head_dim}


QWEN3 = Family(
    name="qwen3",
    display="Qwen3",
    mor_prefix="Qwen3",
    checkpoints="Qwen3 dense checkpoints (QK-norm)",
    hf_architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    dense_rules=LLAMA_STYLE_DENSE_RULES,
    expert_rules=SWIGLU_EXPERT_RULES,
    stock=StockMoE(
        format="qwen3_moe", display="Qwen3-MoE", architecture="Qwen3MoeForCausalLM", config_class="Qwen3MoeConfig",
        block="mlp.", gate="gate.weight", expert_gate="experts.{expert}.gate_proj.weight",
        expert_up="experts.{expert}.up_proj.weight", expert_down="experts.{expert}.down_proj.weight",
        config_fields=_moe_fields,
    ),
    refusals=_qwen3_refusals,
    qkv_bias=lambda config: False,
    qk_norm=True,
    default_head_dim=128,  # Qwen3Config's default: not hidden size / heads (Qwen3-0.6B: 16 heads of 128, hidden 1024)
)


# ---------------------------------------------------------------- Llama (Llama 3.x)


def _llama_refusals(config: dict) -> Optional[str]:
    if config.get("attention_bias"):
        return "attention biases (attention_bias: true) are not supported"
    if config.get("mlp_bias"):
        return "FFN biases (mlp_bias: true) are not supported"
    if (config.get("pretraining_tp") or 1) != 1:
        return f"pretraining_tp {config['pretraining_tp']} is not supported; only 1 (the weights as stored)"
    refusal = _common_refusals(config, rope_types=("default", "llama3"))
    if refusal:
        return refusal
    if rope_type(config) == "llama3":
        params = rope_parameters(config)
        if "factor" not in params:
            return "llama3 RoPE scaling without a factor"
        differing = [f"{key} {params.get(key)}" for key, value in LLAMA3_FIXED.items() if float(params.get(key, -1)) != value]
        if differing:
            fixed = ", ".join(f"{key} {value:g}" for key, value in LLAMA3_FIXED.items())
            return (f"llama3 RoPE scaling with {', '.join(differing)} is not supported: megatron-core computes it with "
                    f"{fixed}")
    return None


def _mixtral_fields(arch: Architecture, num_experts: int, topk: int) -> dict:
    # Mixtral softmaxes all N logits, keeps the top k and renormalises them: the softmax over the chosen k
    return {"num_local_experts": num_experts, "num_experts_per_tok": topk, "intermediate_size": arch.ffn_hidden_size,
            "head_dim": arch.head_dim, "sliding_window": None, "router_jitter_noise": 0.0}


LLAMA = Family(
    name="llama",
    display="Llama",
    mor_prefix="Llama",
    checkpoints="Llama 3.x dense checkpoints, llama3 RoPE scaling included",
    hf_architectures=("LlamaForCausalLM",),
    model_types=("llama",),
    dense_rules=LLAMA_STYLE_DENSE_RULES,
    expert_rules=SWIGLU_EXPERT_RULES,
    stock=StockMoE(
        format="mixtral", display="Mixtral", architecture="MixtralForCausalLM", config_class="MixtralConfig",
        block="block_sparse_moe.", gate="gate.weight", expert_gate="experts.{expert}.w1.weight",
        expert_up="experts.{expert}.w3.weight", expert_down="experts.{expert}.w2.weight",
        config_fields=_mixtral_fields,
    ),
    refusals=_llama_refusals,
    qkv_bias=lambda config: False,
    qk_norm=False,
)

FAMILIES: Tuple[Family, ...] = (QWEN2, QWEN3, LLAMA)
FAMILIES_BY_NAME: Dict[str, Family] = {family.name: family for family in FAMILIES}
STOCK_FORMATS: Dict[str, Family] = {family.stock.format: family for family in FAMILIES}


def family_of(config: dict) -> Family:
    """The family of a dense config.json; ArchitectureError naming what is supported otherwise."""
    for family in FAMILIES:
        if family.matches(config):
            return family
    found = ", ".join(config.get("architectures") or []) or config.get("model_type") or "unknown"
    supported = "; ".join(f"{', '.join(f.hf_architectures)} ({f.checkpoints})" for f in FAMILIES)
    raise ArchitectureError(f"unsupported architecture {found}; supported: {supported}")


def family_named(name: str) -> Family:
    return FAMILIES_BY_NAME[name]
