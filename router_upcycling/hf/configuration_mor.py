"""Configuration of the Hugging Face `mor` model: Qwen2-MoE without a shared expert, with a choice of router.

An exported `mor` folder carries a copy of this file; it must import nothing but transformers.
"""
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig

ROUTER_TYPES = ("mor", "linear", "mlp", "switch", "locmoe")
ROUTER_AGGREGATIONS = ("sum", "max")


class Qwen2MoRConfig(Qwen2MoeConfig):
    """Qwen2-MoE config plus the router fields of Router Upcycling.

    Every decoder layer is a sparse MoE layer (`decoder_sparse_step=1`, no `mlp_only_layers`) without a
    shared expert. `norm_topk_prob=True` means the top-k weights are a softmax over the k chosen logits
    (megatron-core's `moe_router_pre_softmax=False`), so k copies of one FFN reproduce that FFN exactly.

    Router fields:
        router_type: "mor" (Mixture-of-Routers), "linear", "mlp" (d -> d -> N, GELU), "switch" (linear, top-1) or
            "locmoe" (LocMoE's GrAP gate, no parameters: ReLU of the mean of N contiguous channel groups).
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
        self._check_router_fields()

    def _check_router_fields(self) -> None:
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type must be one of {ROUTER_TYPES}, got {self.router_type!r}")
        if self.router_type == "switch" and self.num_experts_per_tok != 1:
            raise ValueError(f"a switch router sends each token to 1 expert; got num_experts_per_tok={self.num_experts_per_tok}")
        if self.router_type == "locmoe" and self.hidden_size % self.num_experts:
            raise ValueError(f"a locmoe (GrAP) router needs num_experts ({self.num_experts}) to divide hidden_size ({self.hidden_size})")
        if self.router_type == "mor":
            if self.router_aggregation not in ROUTER_AGGREGATIONS:
                raise ValueError(f"router_aggregation must be one of {ROUTER_AGGREGATIONS}, got {self.router_aggregation!r}")
            if self.num_router_keys % self.num_experts:
                raise ValueError(f"num_router_keys ({self.num_router_keys}) must be a multiple of num_experts ({self.num_experts})")
        if self.shared_expert_intermediate_size or self.mlp_only_layers or self.decoder_sparse_step != 1:
            raise ValueError("the mor model has no shared expert and an MoE layer in every block")


__all__ = ["Qwen2MoRConfig"]
