"""megatron-core model pieces built from a checkpoint's metadata (docs/checkpoint-format.md).

The architecture travels with the checkpoint as the source model's Hugging Face config plus a
"moe" block; everything here derives megatron-core objects from those two dicts.
"""
import dataclasses
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from router_upcycling.mcore.compat import moe_submodules
from router_upcycling.mcore.routers import ROUTER_TYPES, LocMoERouter, MixtureOfRoutersRouter, MLPRouter, SwitchRouter
from router_upcycling.errors import UserError
from router_upcycling.mor import AGGREGATIONS, num_router_keys


@dataclasses.dataclass
class MoESettings:
    """The "moe" block of a checkpoint's metadata."""

    num_experts: int = 8
    topk: int = 2
    router: str = "mor"
    num_routers: Optional[int] = None  # mor only; defaults to num_experts
    aggregation: str = "sum"
    router_scale: float = 1.0

    def __post_init__(self):
        if self.router not in ROUTER_TYPES:
            raise UserError(f"unknown router {self.router!r}; expected one of {', '.join(ROUTER_TYPES)}")
        if self.aggregation not in AGGREGATIONS:
            raise UserError(f"unknown router aggregation {self.aggregation!r}; expected sum or max")
        if self.router == "switch":
            self.topk = 1
        if self.router == "mor" and self.num_routers is None:
            self.num_routers = self.num_experts
        if not self.router_scale > 0:
            raise UserError(f"--router-scale must be positive, got {self.router_scale}")
        if self.num_experts < 1:
            raise UserError("--num-experts must be at least 1")
        if not 1 <= self.topk <= self.num_experts:
            raise UserError(f"--topk must be between 1 and the number of experts ({self.num_experts}), got {self.topk}")

    def to_dict(self, hf_config: dict) -> dict:
        """The metadata block, with the derived router sizes spelled out for readers."""
        block = dataclasses.asdict(self)
        if self.router == "mor":
            query_width = hf_config["num_attention_heads"] * head_dim(hf_config)
            block["router_dim"] = query_width // self.num_routers
            block["num_keys"] = num_router_keys(self.num_routers, self.num_experts)
        return block

    @classmethod
    def from_dict(cls, block: dict) -> "MoESettings":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in block.items() if k in fields})


def head_dim(hf_config: dict) -> int:
    return hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]


def rope_theta(hf_config: dict) -> float:
    # transformers 5 keeps it in rope_parameters; older configs at the top level
    params = hf_config.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))


def router_builder(moe: MoESettings, locality_coeff: float = 0.0):
    """The class (or partial) megatron-core's MoELayer builds as its router.

    `locality_coeff` is a training setting, not part of the architecture: LocMoE's locality-loss coefficient.
    """
    if moe.router == "locmoe":
        return functools.partial(LocMoERouter, locality_coeff=locality_coeff)
    if moe.router == "mor":
        return functools.partial(
            MixtureOfRoutersRouter, num_routers=moe.num_routers, aggregation=moe.aggregation, router_scale=moe.router_scale
        )
    if moe.router == "linear":
        # megatron-core's own router; top-1 linear routing is exactly the switch router
        return SwitchRouter if moe.topk == 1 else TopKRouter
    return {"mlp": MLPRouter, "switch": SwitchRouter}[moe.router]


class RMSNorm(torch.nn.Module):
    """Qwen2's RMSNorm (float32 statistics, as transformers computes it) for the local layer spec.

    megatron-core's torch norm refuses sequence parallelism, which MoE with tensor parallelism needs.
    Like megatron's own norms, the weight is replicated over the tensor-parallel group; with sequence
    parallelism each rank sees a slice of the tokens, so the weight is marked `sequence_parallel` and
    megatron's finalize_model_grads all-reduces its gradient over that group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden_fp32 = hidden.float()
        normed = hidden_fp32 * torch.rsqrt(hidden_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(hidden.dtype)


def moe_layer_spec(
    moe: MoESettings, use_transformer_engine: bool = False, moe_grouped_gemm: bool = False, locality_coeff: float = 0.0
) -> ModuleSpec:
    """A GPT layer spec whose MoE uses our router: Transformer Engine modules, or local ones with our RMSNorm."""
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=moe.num_experts, moe_grouped_gemm=moe_grouped_gemm)
        # Both specs must read and write the same checkpoint keys. The local spec stores its pre-MLP norm under the
        # name of the norm Transformer Engine fuses into a dense layer's fc1 ("mlp.linear_fc1.layer_norm_weight");
        # megatron-core's TE MoE spec keeps a separate norm and stores it as "pre_mlp_layernorm.weight". Mapping it
        # to the local name lets upcycled checkpoints (written with local layers) load into TE layers and back.
        spec.submodules.sharded_state_dict_keys_map = {
            **spec.submodules.sharded_state_dict_keys_map, "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
        }
    else:
        spec = get_gpt_layer_local_spec(num_experts=moe.num_experts, moe_grouped_gemm=moe_grouped_gemm, normalization="RMSNorm")
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
    moe_submodules(spec).router = router_builder(moe, locality_coeff)
    return spec


def decoder_block_spec(
    config: TransformerConfig, moe: MoESettings, use_transformer_engine: bool = False, locality_coeff: float = 0.0
) -> TransformerBlockSubmodules:
    """The layers this pipeline stage builds, and the final norm (the same norm as inside the layers)."""
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = RMSNorm
    layer = moe_layer_spec(moe, use_transformer_engine, config.moe_grouped_gemm, locality_coeff)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=final_norm)


def transformer_config(
    hf_config: dict,
    moe: MoESettings,
    *,
    params_dtype: torch.dtype = torch.float32,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    moe_aux_loss_coeff: float = 0.0,
    moe_z_loss_coeff: Optional[float] = None,
    moe_token_dispatcher_type: str = "allgather",
    init_method_std: float = 0.02,
    **overrides,
) -> TransformerConfig:
    """TransformerConfig of the Qwen2 architecture with the MoE settings (no dropout, as the paper)."""
    return TransformerConfig(
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hf_config["hidden_size"],
        num_attention_heads=hf_config["num_attention_heads"],
        num_query_groups=hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
        kv_channels=head_dim(hf_config),
        ffn_hidden_size=hf_config["intermediate_size"],
        moe_ffn_hidden_size=hf_config["intermediate_size"],
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.get("rms_norm_eps", 1e-6),
        add_bias_linear=False,
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=init_method_std,
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.topk,
        # softmax over the chosen logits keeps the upcycled model equal to the dense one; megatron
        # requires pre-softmax for top-1, where our routers restore a unit scale (UnitScaleTop1Mixin)
        moe_router_pre_softmax=moe.topk == 1,
        moe_router_load_balancing_type="aux_loss",
        moe_router_dtype="fp32",  # router logits and probabilities in float32 whatever the model dtype
        moe_aux_loss_coeff=moe_aux_loss_coeff,
        moe_z_loss_coeff=moe_z_loss_coeff,
        moe_token_dispatcher_type=moe_token_dispatcher_type,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=True,
        **overrides,
    )


def build_gpt_model(
    hf_config: dict,
    moe: MoESettings,
    config: TransformerConfig,
    pre_process: bool = True,
    post_process: bool = True,
    use_transformer_engine: bool = False,
    parallel_output: bool = True,
    locality_coeff: float = 0.0,
) -> GPTModel:
    """GPTModel with the Qwen2 architecture (RoPE, RMSNorm, SwiGLU, q/k/v bias) and our MoE router
    (`locality_coeff`: LocMoE's locality-loss coefficient, training only)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, moe, use_transformer_engine, locality_coeff),
        vocab_size=hf_config["vocab_size"],
        max_sequence_length=hf_config.get("max_position_embeddings", 4096),
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=bool(hf_config.get("tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=rope_theta(hf_config),
        parallel_output=parallel_output,
    )


def causal_attention_mask(seq_length: int, device=None) -> torch.Tensor:
    """Explicit causal mask [1, 1, s, s], True = masked (megatron's default one is built on CUDA)."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), diagonal=1)[None, None]
