"""Configurations of the Hugging Face `mor` models: each family's stock MoE without a shared expert, with a choice of
router. Qwen2MoRConfig extends Qwen2-MoE's config, Qwen3MoRConfig Qwen3-MoE's and LlamaMoRConfig Mixtral's (the MoE
form of Llama).

An exported `mor` folder carries a copy of this file; it must import nothing but transformers.
Which router_type values exist, and what each needs of the other fields, is the gates' to say
(modeling_mor.py): a model built from a config with a bad router field refuses it there.
"""
from transformers import PreTrainedConfig
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig


class MoRRouterConfig(PreTrainedConfig):
    """The router fields of Router Upcycling, shared by every family's `mor` config.

    Every decoder layer is a sparse MoE layer without a shared expert. `norm_topk_prob=True` means the top-k weights
    are a softmax over the k chosen logits (megatron-core's `moe_router_pre_softmax=False`), so k copies of one FFN
    reproduce that FFN exactly.

    Router fields:
        router_type: the gate of every MoE layer (modeling_mor.GATES: the Mixture-of-Routers, a linear gate, top-1
            Switch, a 2-layer MLP, or LocMoE's parameter-free GrAP gate).
        num_routers: R, routers per layer (mor only).
        router_dim: d_r, the routers' query size (mor only).
        num_router_keys: K = max(R, N) expert keys per layer (mor only).
        router_aggregation: "sum" or "max" over routers (mor only).
        router_scale: multiplies the mor logits (1.0 = off).
        router_query_norm: the mor routers normalise each head of their queries as the attention does (RMS norm with
            the gate's `query_norm_weight` [head_dim] and rms_norm_eps; QK-norm models).
    """

    router_type: str = "mor"
    num_routers: int = 8
    router_dim: int = 128
    num_router_keys: int = 8
    router_aggregation: str = "sum"
    router_scale: float = 1.0
    router_query_norm: bool = False
    norm_topk_prob: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if getattr(self, "shared_expert_intermediate_size", 0) or getattr(self, "mlp_only_layers", None) \
                or getattr(self, "decoder_sparse_step", 1) != 1:
            raise ValueError("the mor model has no shared expert and an MoE layer in every block")


class Qwen2MoRConfig(Qwen2MoeConfig, MoRRouterConfig):
    """Qwen2-MoE (Qwen1.5, Qwen2, Qwen2.5 upcycled) with the router fields of MoRRouterConfig."""

    model_type = "qwen2_mor"

    # fields the stock config also has: its defaults would win over MoRRouterConfig's
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1


class Qwen3MoRConfig(Qwen3MoeConfig, MoRRouterConfig):
    """Qwen3-MoE (Qwen3 upcycled: QK-norm, head_dim written out) with the router fields of MoRRouterConfig."""

    model_type = "qwen3_mor"

    # fields the stock config also has: its defaults would win over MoRRouterConfig's
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1


class LlamaMoRConfig(MixtralConfig, MoRRouterConfig):
    """Mixtral (Llama 3 upcycled, its RoPE scaling kept in rope_parameters) with the router fields of MoRRouterConfig."""

    model_type = "llama_mor"


__all__ = ["LlamaMoRConfig", "MoRRouterConfig", "Qwen2MoRConfig", "Qwen3MoRConfig"]
