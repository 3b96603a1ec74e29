"""Hugging Face `mor` model: Qwen2-MoE without a shared expert, whose `mlp.gate` is the chosen router.

Attention, norms, rotary embedding, fused experts, the decoder layer's forward, the model's forward and
generation are transformers' own Qwen2-MoE classes; this file adds only the routers and the sparse block
that has no shared expert. An exported folder carries this file, `configuration_mor.py` and the router
math as `mor.py`; it loads with `trust_remote_code=True` and needs nothing but torch and transformers.

Shape legend
    T  tokens (batch * sequence)   d  hidden size     N  experts    k  experts per token
    R  routers                     d_r router dim     K  expert keys (max(R, N))
"""
import os
import shutil
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.models.qwen2_moe.modeling_qwen2_moe import (
    Qwen2MoeAttention,
    Qwen2MoeDecoderLayer,
    Qwen2MoeExperts,
    Qwen2MoeForCausalLM,
    Qwen2MoeModel,
    Qwen2MoePreTrainedModel,
    Qwen2MoeRMSNorm,
    Qwen2MoeRotaryEmbedding,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils.output_capturing import OutputRecorder

from .configuration_mor import Qwen2MoRConfig
from .mor import grap_expert_logits, mor_expert_logits


class Qwen2MoRRouter(nn.Module):
    """Base of the gates: logits from `expert_logits`, then top-k and the top-k weights.

    `forward(hidden [T, d]) -> (router_logits [T, N] float32, top_k_weights [T, k], top_k_index [T, k])`,
    the contract of stock Qwen2-MoE's router. With `norm_topk_prob` (the default) the weights are a softmax
    over the k chosen logits; without it, the chosen entries of a softmax over all N logits.

    Each gate names the `router_type` it computes (the value an exported config.json holds: the router registry's
    `hf_gate`) and refuses config fields it cannot follow in `check_config`.
    """

    router_type: str

    def __init__(self, config: Qwen2MoRConfig, top_k: int):
        super().__init__()
        self.check_config(config)
        self.top_k = top_k
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.norm_topk_prob = config.norm_topk_prob

    @classmethod
    def check_config(cls, config: Qwen2MoRConfig) -> None:
        """Raise ValueError for router fields this gate cannot follow."""

    def expert_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits z [T, N] in float32 from hidden [T, d] (float32)."""
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = hidden_states.reshape(-1, self.hidden_dim).float()
        router_logits = self.expert_logits(hidden)  # [T, N]
        if self.norm_topk_prob:
            top_k_logits, top_k_index = torch.topk(router_logits, self.top_k, dim=-1)
            top_k_weights = top_k_logits.softmax(dim=-1)
        else:
            top_k_weights, top_k_index = torch.topk(router_logits.softmax(dim=-1), self.top_k, dim=-1)
        return router_logits, top_k_weights.to(hidden_states.dtype), top_k_index


class Qwen2MoRMixtureOfRoutersGate(Qwen2MoRRouter):
    """Mixture-of-Routers: R query projections `query_weight` [R, d_r, d] scored against `keys` [K, d_r]."""

    router_type = "mor"
    AGGREGATIONS = ("sum", "max")

    def __init__(self, config: Qwen2MoRConfig):
        super().__init__(config, config.num_experts_per_tok)
        self.aggregation = config.router_aggregation
        self.scale = config.router_scale
        self.query_weight = nn.Parameter(torch.zeros(config.num_routers, config.router_dim, config.hidden_size))
        self.keys = nn.Parameter(torch.zeros(config.num_router_keys, config.router_dim))

    @classmethod
    def check_config(cls, config: Qwen2MoRConfig) -> None:
        if config.router_aggregation not in cls.AGGREGATIONS:
            raise ValueError(f"router_aggregation must be one of {cls.AGGREGATIONS}, got {config.router_aggregation!r}")
        if config.num_router_keys % config.num_experts:
            raise ValueError(f"num_router_keys ({config.num_router_keys}) must be a multiple of num_experts ({config.num_experts})")

    def expert_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return mor_expert_logits(
            hidden, self.query_weight.float(), self.keys.float(), self.num_experts, self.aggregation, self.scale
        )


class Qwen2MoRLinearGate(Qwen2MoRRouter):
    """Linear router `weight` [N, d]."""

    router_type = "linear"

    def __init__(self, config: Qwen2MoRConfig, top_k: int = None):
        super().__init__(config, config.num_experts_per_tok if top_k is None else top_k)
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def expert_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight.float())


class Qwen2MoRSwitchGate(Qwen2MoRLinearGate):
    """Switch Transformer's router: the linear gate, top-1."""

    router_type = "switch"

    def __init__(self, config: Qwen2MoRConfig):
        super().__init__(config, top_k=1)

    @classmethod
    def check_config(cls, config: Qwen2MoRConfig) -> None:
        if config.num_experts_per_tok != 1:
            raise ValueError(f"a switch router sends each token to 1 expert; got num_experts_per_tok={config.num_experts_per_tok}")


class Qwen2MoRMLPGate(Qwen2MoRRouter):
    """Two-layer MLP router d -> d -> N with GELU between, no biases."""

    router_type = "mlp"

    def __init__(self, config: Qwen2MoRConfig):
        super().__init__(config, config.num_experts_per_tok)
        self.fc1 = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.fc2 = nn.Linear(config.hidden_size, config.num_experts, bias=False)

    def expert_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(F.gelu(F.linear(hidden, self.fc1.weight.float())), self.fc2.weight.float())


class Qwen2MoRGrAPGate(Qwen2MoRRouter):
    """LocMoE's GrAP gate: logit i = ReLU(mean of channel group i of N contiguous groups); no parameters."""

    router_type = "locmoe"

    def __init__(self, config: Qwen2MoRConfig):
        super().__init__(config, config.num_experts_per_tok)

    @classmethod
    def check_config(cls, config: Qwen2MoRConfig) -> None:
        if config.hidden_size % config.num_experts:
            raise ValueError(f"a locmoe (GrAP) router needs num_experts ({config.num_experts}) to divide hidden_size ({config.hidden_size})")

    def expert_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return grap_expert_logits(hidden, self.num_experts)


GATES = {gate.router_type: gate for gate in (
    Qwen2MoRMixtureOfRoutersGate, Qwen2MoRLinearGate, Qwen2MoRSwitchGate, Qwen2MoRMLPGate, Qwen2MoRGrAPGate)}


def build_router(config: Qwen2MoRConfig) -> Qwen2MoRRouter:
    """The gate that `config.router_type` names."""
    if config.router_type not in GATES:
        raise ValueError(f"router_type must be one of {tuple(GATES)}, got {config.router_type!r}")
    return GATES[config.router_type](config)


class Qwen2MoRSparseMoeBlock(nn.Module):
    """Router + fused experts, no shared expert: hidden [B, S, d] -> [B, S, d]."""

    def __init__(self, config: Qwen2MoRConfig):
        super().__init__()
        self.gate = build_router(config)
        self.experts = Qwen2MoeExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden = hidden_states.view(-1, hidden_dim)  # [T, d]
        _, top_k_weights, top_k_index = self.gate(hidden)
        return self.experts(hidden, top_k_index, top_k_weights).reshape(batch_size, sequence_length, hidden_dim)


class Qwen2MoRDecoderLayer(Qwen2MoeDecoderLayer):
    """Qwen2-MoE decoder layer (its forward) with the shared-expert-free sparse block in every layer."""

    def __init__(self, config: Qwen2MoRConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.self_attn = Qwen2MoeAttention(config, layer_idx)
        self.mlp = Qwen2MoRSparseMoeBlock(config)
        self.input_layernorm = Qwen2MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_size = config.hidden_size


class Qwen2MoRPreTrainedModel(Qwen2MoePreTrainedModel):
    config: Qwen2MoRConfig
    config_class = Qwen2MoRConfig
    _no_split_modules = ["Qwen2MoRDecoderLayer"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(Qwen2MoRRouter, index=0),
        "hidden_states": Qwen2MoRDecoderLayer,
        "attentions": Qwen2MoeAttention,
    }
    # Routers are small and decide which experts run: keep them in float32 in bf16/fp16 models.
    _keep_in_fp32_modules_strict = ["mlp.gate"]

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers looks for its experts decorator in this file's source; the experts here are its own
        # decorated Qwen2MoeExperts, so every experts implementation stock Qwen2-MoE offers applies.
        return True

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        # transformers copies `mor.py` as found beside this file; inside the router_upcycling package that is a
        # shim importing the package, so put the real router math there to keep the saved folder self-contained.
        router_math_file = sys.modules[mor_expert_logits.__module__].__file__
        shutil.copyfile(router_math_file, os.path.join(save_directory, "mor.py"))

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Qwen2MoRMixtureOfRoutersGate):
            init.normal_(module.query_weight, mean=0.0, std=std)
            init.normal_(module.keys, mean=0.0, std=std)
        elif isinstance(module, Qwen2MoRLinearGate):
            init.normal_(module.weight, mean=0.0, std=std)


class Qwen2MoRModel(Qwen2MoRPreTrainedModel, Qwen2MoeModel):
    """Qwen2-MoE's decoder stack (and forward) built from `Qwen2MoRDecoderLayer`s."""

    def __init__(self, config: Qwen2MoRConfig):
        Qwen2MoRPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [Qwen2MoRDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = Qwen2MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2MoeRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class Qwen2MoRForCausalLM(Qwen2MoRPreTrainedModel, Qwen2MoeForCausalLM):
    """Causal LM head over `Qwen2MoRModel`; forward, loss, load-balancing loss and generation are Qwen2-MoE's."""

    def __init__(self, config: Qwen2MoRConfig):
        Qwen2MoRPreTrainedModel.__init__(self, config)
        self.model = Qwen2MoRModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()


Qwen2MoRConfig.register_for_auto_class()
Qwen2MoRModel.register_for_auto_class("AutoModel")
Qwen2MoRForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["Qwen2MoRForCausalLM", "Qwen2MoRModel", "Qwen2MoRPreTrainedModel", "Qwen2MoRConfig"]
