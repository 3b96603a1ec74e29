"""Hugging Face `mor` models: each family's stock MoE without a shared expert, whose `mlp.gate` is the chosen router.

| family | classes | attention, norms, rotary embedding, experts, forward and generation: transformers' own |
|---|---|---|
| Qwen2 (Qwen1.5, Qwen2, Qwen2.5) | Qwen2MoRModel, Qwen2MoRForCausalLM | Qwen2-MoE's (q/k/v biases) |
| Qwen3 | Qwen3MoRModel, Qwen3MoRForCausalLM | Qwen3-MoE's (per-head RMSNorm of queries and keys) |
| Llama 3 | LlamaMoRModel, LlamaMoRForCausalLM | Mixtral's (Llama's attention; llama3 RoPE scaling from rope_parameters) |

This file adds only the routers (gates) and the sparse block that has no shared expert. An exported folder carries
this file, `configuration_mor.py` and the router math as `mor.py`; it loads with `trust_remote_code=True` and needs
nothing but torch and transformers.

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
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import PreTrainedModel
from transformers.models.mixtral.modeling_mixtral import (
    MixtralAttention,
    MixtralDecoderLayer,
    MixtralExperts,
    MixtralForCausalLM,
    MixtralModel,
    MixtralPreTrainedModel,
    MixtralRMSNorm,
    MixtralRotaryEmbedding,
)
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
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeAttention,
    Qwen3MoeDecoderLayer,
    Qwen3MoeExperts,
    Qwen3MoeForCausalLM,
    Qwen3MoeModel,
    Qwen3MoePreTrainedModel,
    Qwen3MoeRMSNorm,
    Qwen3MoeRotaryEmbedding,
)
from transformers.utils.output_capturing import OutputRecorder

from .configuration_mor import LlamaMoRConfig, MoRRouterConfig, Qwen2MoRConfig, Qwen3MoRConfig
from .mor import grap_expert_logits, mor_expert_logits


class MoRGate(nn.Module):
    """Base of the gates: logits from `expert_logits`, then top-k and the top-k weights.

    `forward(hidden [T, d]) -> (router_logits [T, N] float32, top_k_weights [T, k], top_k_index [T, k])`,
    the contract of stock Qwen2-MoE's router. With `norm_topk_prob` (the default) the weights are a softmax
    over the k chosen logits; without it, the chosen entries of a softmax over all N logits.

    Each gate names the `router_type` it computes (the value an exported config.json holds: the router registry's
    `hf_gate`) and refuses config fields it cannot follow in `check_config`.
    """

    router_type: str

    def __init__(self, config: MoRRouterConfig, top_k: int):
        super().__init__()
        self.check_config(config)
        self.top_k = top_k
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.norm_topk_prob = config.norm_topk_prob

    @classmethod
    def check_config(cls, config: MoRRouterConfig) -> None:
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


class MoRMixtureOfRoutersGate(MoRGate):
    """Mixture-of-Routers: R query projections `query_weight` [R, d_r, d] scored against `keys` [K, d_r]; with
    `router_query_norm`, each head of the queries RMS-normalised first with `query_norm_weight` [d_h]."""

    router_type = "mor"
    AGGREGATIONS = ("sum", "max")

    def __init__(self, config: MoRRouterConfig):
        super().__init__(config, config.num_experts_per_tok)
        self.aggregation = config.router_aggregation
        self.scale = config.router_scale
        self.query_weight = nn.Parameter(torch.zeros(config.num_routers, config.router_dim, config.hidden_size))
        self.keys = nn.Parameter(torch.zeros(config.num_router_keys, config.router_dim))
        self.query_norm_weight, self.query_norm_eps = None, config.rms_norm_eps
        if config.router_query_norm:
            head_dim = config.router_dim * config.num_routers // config.num_attention_heads
            self.query_norm_weight = nn.Parameter(torch.ones(head_dim))

    @classmethod
    def check_config(cls, config: MoRRouterConfig) -> None:
        if config.router_aggregation not in cls.AGGREGATIONS:
            raise ValueError(f"router_aggregation must be one of {cls.AGGREGATIONS}, got {config.router_aggregation!r}")
        if config.num_router_keys % config.num_experts:
            raise ValueError(f"num_router_keys ({config.num_router_keys}) must be a multiple of num_experts ({config.num_experts})")
        if config.router_query_norm and (config.num_attention_heads % config.num_routers):
            raise ValueError(f"router_query_norm needs whole heads per router: {config.num_routers} routers do not "
                             f"divide {config.num_attention_heads} heads")

    def expert_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        query_norm = None if self.query_norm_weight is None else self.query_norm_weight.float()
        return mor_expert_logits(
            hidden, self.query_weight.float(), self.keys.float(), self.num_experts, self.aggregation, self.scale,
            query_norm, self.query_norm_eps,
        )


class MoRLinearGate(MoRGate):
    """Linear router `weight` [N, d]."""

    router_type = "linear"

    def __init__(self, config: MoRRouterConfig, top_k: int = None):
        super().__init__(config, config.num_experts_per_tok if top_k is None else top_k)
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def expert_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight.float())


class MoRSwitchGate(MoRLinearGate):
    """Switch Transformer's router: the linear gate, top-1."""

    router_type = "switch"

    def __init__(self, config: MoRRouterConfig):
        super().__init__(config, top_k=1)

    @classmethod
    def check_config(cls, config: MoRRouterConfig) -> None:
        if config.num_experts_per_tok != 1:
            raise ValueError(f"a switch router sends each token to 1 expert; got num_experts_per_tok={config.num_experts_per_tok}")


class MoRMLPGate(MoRGate):
    """Two-layer MLP router d -> d -> N with GELU between, no biases."""

    router_type = "mlp"

    def __init__(self, config: MoRRouterConfig):
        super().__init__(config, config.num_experts_per_tok)
        self.fc1 = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.fc2 = nn.Linear(config.hidden_size, config.num_experts, bias=False)

    def expert_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(F.gelu(F.linear(hidden, self.fc1.weight.float())), self.fc2.weight.float())


class MoRGrAPGate(MoRGate):
    """LocMoE's GrAP gate: logit i = ReLU(mean of channel group i of N contiguous groups); no parameters."""

    router_type = "locmoe"

    def __init__(self, config: MoRRouterConfig):
        super().__init__(config, config.num_experts_per_tok)

    @classmethod
    def check_config(cls, config: MoRRouterConfig) -> None:
        if config.hidden_size % config.num_experts:
            raise ValueError(f"a locmoe (GrAP) router needs num_experts ({config.num_experts}) to divide hidden_size ({config.hidden_size})")

    def expert_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return grap_expert_logits(hidden, self.num_experts)


GATES = {gate.router_type: gate for gate in (
    MoRMixtureOfRoutersGate, MoRLinearGate, MoRSwitchGate, MoRMLPGate, MoRGrAPGate)}


def build_router(config: MoRRouterConfig) -> MoRGate:
    """The gate that `config.router_type` names."""
    if config.router_type not in GATES:
        raise ValueError(f"router_type must be one of {tuple(GATES)}, got {config.router_type!r}")
    return GATES[config.router_type](config)


class MoRSparseMoeBlock(nn.Module):
    """Router + the family's fused experts, no shared expert: hidden [B, S, d] -> [B, S, d]."""

    def __init__(self, config: MoRRouterConfig, experts_class: type):
        super().__init__()
        self.gate = build_router(config)
        self.experts = experts_class(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden = hidden_states.view(-1, hidden_dim)  # [T, d]
        _, top_k_weights, top_k_index = self.gate(hidden)
        return self.experts(hidden, top_k_index, top_k_weights).reshape(batch_size, sequence_length, hidden_dim)


# ---------------------------------------------------------------- one set of classes per family, from these mixins


class MoRDecoderLayer:
    """The family's decoder layer (its forward) with the shared-expert-free sparse block in every layer."""

    attention_class: type
    norm_class: type
    experts_class: type

    def __init__(self, config: MoRRouterConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = self.attention_class(config, layer_idx)
        self.mlp = MoRSparseMoeBlock(config, self.experts_class)
        self.input_layernorm = self.norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = self.norm_class(config.hidden_size, eps=config.rms_norm_eps)


class MoRPreTrainedModel:
    """What every family's `mor` PreTrainedModel adds: float32 routers, the router math in saved folders, router init."""

    # Routers are small and decide which experts run: keep them in float32 in bf16/fp16 models.
    _keep_in_fp32_modules_strict = ["mlp.gate"]

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers looks for its experts decorator in this file's source; the experts here are its own decorated
        # classes, so every experts implementation the stock model offers applies.
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
        if isinstance(module, MoRMixtureOfRoutersGate):
            init.normal_(module.query_weight, mean=0.0, std=std)
            init.normal_(module.keys, mean=0.0, std=std)
        elif isinstance(module, MoRLinearGate):
            init.normal_(module.weight, mean=0.0, std=std)


def recorded_outputs(decoder_layer: type, attention: type) -> dict:
    return {"router_logits": OutputRecorder(MoRGate, index=0), "hidden_states": decoder_layer,
            "attentions": attention}


class MoRModel:
    """The family's decoder stack (and forward) built from its MoR decoder layers."""

    decoder_layer_class: type
    norm_class: type
    rotary_class: type

    def __init__(self, config: MoRRouterConfig):
        PreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [self.decoder_layer_class(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = self.norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = self.rotary_class(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class MoRForCausalLM:
    """Causal LM head over the family's MoR model; forward, loss, load-balancing loss and generation are the stock
    model's."""

    model_class: type

    def __init__(self, config: MoRRouterConfig):
        PreTrainedModel.__init__(self, config)
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()


# ---------------------------------------------------------------- Qwen2 (Qwen2-MoE's classes)


class Qwen2MoRDecoderLayer(MoRDecoderLayer, Qwen2MoeDecoderLayer):
    attention_class, norm_class, experts_class = Qwen2MoeAttention, Qwen2MoeRMSNorm, Qwen2MoeExperts


class Qwen2MoRPreTrainedModel(MoRPreTrainedModel, Qwen2MoePreTrainedModel):
    config: Qwen2MoRConfig
    config_class = Qwen2MoRConfig
    _no_split_modules = ["Qwen2MoRDecoderLayer"]
    _can_record_outputs = recorded_outputs(Qwen2MoRDecoderLayer, Qwen2MoeAttention)


class Qwen2MoRModel(MoRModel, Qwen2MoRPreTrainedModel, Qwen2MoeModel):
    decoder_layer_class, norm_class, rotary_class = Qwen2MoRDecoderLayer, Qwen2MoeRMSNorm, Qwen2MoeRotaryEmbedding


class Qwen2MoRForCausalLM(MoRForCausalLM, Qwen2MoRPreTrainedModel, Qwen2MoeForCausalLM):
    model_class = Qwen2MoRModel


# ---------------------------------------------------------------- Qwen3 (Qwen3-MoE's classes)


class Qwen3MoRDecoderLayer(MoRDecoderLayer, Qwen3MoeDecoderLayer):
    attention_class, norm_class, experts_class = Qwen3MoeAttention, Qwen3MoeRMSNorm, Qwen3MoeExperts


class Qwen3MoRPreTrainedModel(MoRPreTrainedModel, Qwen3MoePreTrainedModel):
    config: Qwen3MoRConfig
    config_class = Qwen3MoRConfig
    _no_split_modules = ["Qwen3MoRDecoderLayer"]
    _can_record_outputs = recorded_outputs(Qwen3MoRDecoderLayer, Qwen3MoeAttention)


class Qwen3MoRModel(MoRModel, Qwen3MoRPreTrainedModel, Qwen3MoeModel):
    decoder_layer_class, norm_class, rotary_class = Qwen3MoRDecoderLayer, Qwen3MoeRMSNorm, Qwen3MoeRotaryEmbedding


class Qwen3MoRForCausalLM(MoRForCausalLM, Qwen3MoRPreTrainedModel, Qwen3MoeForCausalLM):
    model_class = Qwen3MoRModel


# ---------------------------------------------------------------- Llama 3 (Mixtral's classes)


class LlamaMoRDecoderLayer(MoRDecoderLayer, MixtralDecoderLayer):
    attention_class, norm_class, experts_class = MixtralAttention, MixtralRMSNorm, MixtralExperts


class LlamaMoRPreTrainedModel(MoRPreTrainedModel, MixtralPreTrainedModel):
    config: LlamaMoRConfig
    config_class = LlamaMoRConfig
    _no_split_modules = ["LlamaMoRDecoderLayer"]
    _can_record_outputs = recorded_outputs(LlamaMoRDecoderLayer, MixtralAttention)


class LlamaMoRModel(MoRModel, LlamaMoRPreTrainedModel, MixtralModel):
    decoder_layer_class, norm_class, rotary_class = LlamaMoRDecoderLayer, MixtralRMSNorm, MixtralRotaryEmbedding


class LlamaMoRForCausalLM(MoRForCausalLM, LlamaMoRPreTrainedModel, MixtralForCausalLM):
    model_class = LlamaMoRModel


for _config, _model, _causal_lm in ((Qwen2MoRConfig, Qwen2MoRModel, Qwen2MoRForCausalLM),
                                    (Qwen3MoRConfig, Qwen3MoRModel, Qwen3MoRForCausalLM),
                                    (LlamaMoRConfig, LlamaMoRModel, LlamaMoRForCausalLM)):
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModel")
    _causal_lm.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["LlamaMoRForCausalLM", "LlamaMoRModel", "Qwen2MoRForCausalLM", "Qwen2MoRModel", "Qwen2MoRPreTrainedModel",
           "Qwen3MoRForCausalLM", "Qwen3MoRModel"]
