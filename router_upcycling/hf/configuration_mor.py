"""Configuration of the Hugging Face `mor` model: Qwen2-MoE without a shared expert, with a choice of router.

An exported `mor` folder carries a copy of this file; it must import nothing but transformers.
Which router_type values exist, and what each needs of the other fields, is the gates' to say
(modeling_mor.py): a model built from a config with a bad router field refuses it there.
"""
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig


class Qwen2MoRConfig(Qwen2MoeConfig):
    """Qwen2-MoE config plus the router fields of Router Upcycling.

    Every decoder layer is a sparse MoE layer (`decoder_sparse_step=1`, no `mlp_only_layers`) without a
    shared expert. `norm_topk_prob=True` means the top-k weights are a softmax over the k chosen logits
    (megatron-core's `moe_router_pre_softmax=False`), so k copies of one FFN reproduce that FFN exactly.

    Router fields:
        router_type: the gate of every MoE layer (modeling_mor.GATES: the Mixture-of-Routers, a linear gate, top-1
            Switch, a 2-layer MLP, or LocMoE's parameter-free GrAP gate).
        num_routers: R, routers per layer (mor only).
        router_dim: d_r, the routers' query size (mor only).
        num_router_keys: K = max(R, N) expert keys per layer (mor only).
        router_aggregation: "sum" or "max" over routers (mor only).
        router_scale: multiplies the mor logits (1.0 = off).
    """

    model_type = "qwen2_mor"

    router_type: str = "mor"
    num_routers: int = 8
    router_dim: int = 128
    num_router_keys: int = 8
    router_aggregation: str = "sum"
    router_scale: float = 1.0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.shared_expert_intermediate_size or self.mlp_only_layers or self.decoder_sparse_step != 1:
            raise ValueError("the mor model has no shared expert and an MoE layer in every block")


__all__ = ["Qwen2MoRConfig"]
