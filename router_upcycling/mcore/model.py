"""megatron-core model pieces built from a checkpoint's metadata (docs/checkpoint-format.md).

The architecture travels with the checkpoint as the source model's Hugging Face config plus a "moe" block;
everything here derives megatron-core objects from their typed forms (Architecture, MoESettings): the family
gives the TransformerConfig fields, the router registry the router.
"""
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from router_upcycling.mcore.compat import moe_submodules
from router_upcycling.settings.architecture import Architecture
from router_upcycling.settings.families import family_named
from router_upcycling.settings.moe import MoESettings
from router_upcycling.settings.routers import resolve

ACTIVATIONS = {"silu": F.silu}


def router_builder(moe: MoESettings, **training_options):
    """The class (or partial) megatron-core's MoELayer builds as its router: the registry's, with its keywords.

    `training_options`: training-only settings of some routers (LocMoE's `locality_coeff`); those the router does
    not take must be unset (0 or None).
    """
    spec = moe.spec
    unused = [name for name, value in training_options.items() if value and name not in spec.training_options]
    if unused:
        raise ValueError(f"the {spec.name} router takes no {', '.join(unused)}")
    router_class = resolve(spec.mcore_class)
    if not isinstance(router_class, type):  # a callable that picks the class from the settings
        router_class = router_class(moe)
    keywords = {**spec.mcore_keywords(moe),
                **{name: value for name, value in training_options.items() if name in spec.training_options}}
    return functools.partial(router_class, **keywords) if keywords else router_class


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
    moe: MoESettings, use_transformer_engine: bool = False, moe_grouped_gemm: bool = False, qk_layernorm: bool = False,
    **training_options,
) -> ModuleSpec:
    """A GPT layer spec whose MoE uses our router: Transformer Engine modules, or local ones with our RMSNorm (also
    the per-head query/key norm of QK-norm models: megatron-core applies it over each head's d_h channels)."""
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=moe.num_experts, moe_grouped_gemm=moe_grouped_gemm,
                                                          qk_layernorm=qk_layernorm)
        # Both specs must read and write the same checkpoint keys. The local spec stores its pre-MLP norm under the
        # name of the norm Transformer Engine fuses into a dense layer's fc1 ("mlp.linear_fc1.layer_norm_weight");
        # megatron-core's TE MoE spec keeps a separate norm and stores it as "pre_mlp_layernorm.weight". Mapping it
        # to the local name lets upcycled checkpoints (written with local layers) load into TE layers and back.
        spec.submodules.sharded_state_dict_keys_map = {
            **spec.submodules.sharded_state_dict_keys_map, "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
        }
    else:
        spec = get_gpt_layer_local_spec(num_experts=moe.num_experts, moe_grouped_gemm=moe_grouped_gemm,
                                        qk_layernorm=qk_layernorm, normalization="RMSNorm")
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
        if qk_layernorm:
            spec.submodules.self_attention.submodules.q_layernorm = RMSNorm
            spec.submodules.self_attention.submodules.k_layernorm = RMSNorm
    moe_submodules(spec).router = router_builder(moe, **training_options)
    return spec


def decoder_block_spec(
    config: TransformerConfig, moe: MoESettings, use_transformer_engine: bool = False, vp_stage: Optional[int] = None,
    **training_options
) -> TransformerBlockSubmodules:
    """The layers this pipeline stage (virtual stage `vp_stage`) builds, and the final norm (the same norm as inside
    the layers)."""
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = RMSNorm
    layer = moe_layer_spec(moe, use_transformer_engine, config.moe_grouped_gemm, config.qk_layernorm, **training_options)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=final_norm)


def transformer_config(
    arch: Architecture,
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
    """TransformerConfig of the architecture (its family's fields) with the MoE settings (no dropout, as the paper)."""
    fields = family_named(arch.family).mcore_config_fields(arch)
    fields["activation_func"] = ACTIVATIONS[fields.pop("activation")]
    return TransformerConfig(
        **fields,
        moe_ffn_hidden_size=arch.ffn_hidden_size,
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
    arch: Architecture,
    moe: MoESettings,
    config: TransformerConfig,
    pre_process: bool = True,
    post_process: bool = True,
    use_transformer_engine: bool = False,
    parallel_output: bool = True,
    **training_options,
) -> GPTModel:
    """GPTModel of the architecture (RoPE, RMSNorm, SwiGLU, optional QK-norm) with our MoE router (`training_options`: training-only
    router settings, e.g. LocMoE's locality_coeff)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, moe, use_transformer_engine, **training_options),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=arch.rope_theta,
        # Llama 3's frequency scaling, as megatron-core computes it (the family refuses other forms of it)
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        parallel_output=parallel_output,
    )


def causal_attention_mask(seq_length: int, device=None) -> torch.Tensor:
    """Explicit causal mask [1, 1, s, s], True = masked (megatron's default one is built on CUDA)."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), diagonal=1)[None, None]
