"""Routers for megatron-core's MoELayer, plugged in through the layer spec (`MoESubmodules.router`).

Each is a `TopKRouter` subclass that replaces only what differs: parameter creation and
`gating()` (the logits). Top-k selection, softmax over the chosen logits, the load-balancing
aux loss, z-loss and expert bias stay megatron-core's own `routing()`.

| router | logits (computed in float32)                 | parameters (model dtype)                |
|--------|----------------------------------------------|-----------------------------------------|
| mor    | Mixture-of-Routers (router_upcycling.mor)    | query_weight [R, d_r, d], keys [K, d_r] |
|        |   with query_norm (QK-norm models)           |   + query_norm_weight [d_h]             |
| linear | megatron-core's TopKRouter, unchanged        | weight [N, d]                           |
| mlp    | fc2(gelu(fc1 x)), d -> d -> N                | fc1.weight [d, d], fc2.weight [N, d]    |
| switch | linear, top-1 (see SwitchRouter)             | weight [N, d]                           |
| locmoe | LocMoE's GrAP: ReLU(mean of channel group i) | none (see LocMoERouter)                 |

Top-1 routing (switch, or any router with topk = 1) keeps a unit expert scale; see UnitScaleTop1Mixin.
Which router a model uses, and with which keywords, is the registry's (router_upcycling.settings.routers).

Parameters take the model's dtype, as megatron-core's own router weight does: a bf16 model keeps bf16
router weights with float32 main copies in the optimizer (megatron-core's distributed-optimizer
checkpoints hold one parameter dtype per model). Logits are always computed in float32
(`moe_router_dtype="fp32"`); upcycled checkpoints store routers in float32 whatever --dtype.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from router_upcycling.mcore.compat import topk_router_keywords
from router_upcycling.mor import grap_expert_logits, locality_loss, mor_expert_logits, routing_distribution
from router_upcycling.settings.routers import check_grap_split


def _mark_router_parameter(param: torch.nn.Parameter, config: TransformerConfig) -> torch.nn.Parameter:
    # Like megatron's own router weight: replicated over TP, so with sequence parallelism its
    # gradient must be all-reduced over the TP group (DDP reads this attribute).
    setattr(param, "sequence_parallel", config.sequence_parallel)
    return param


class UnitScaleTop1Mixin:
    """Top-1 routing that keeps the upcycled model equal to the dense one.

    megatron-core requires `moe_router_pre_softmax` for top-1, which scales the chosen expert's
    output by its softmax probability p (as Switch Transformer does). With the forward value
    p / p.detach() = 1 the model computes the dense function at step 0 (method.md part 1) and the
    router still receives the gradient of p. For top-k > 1 routing is megatron-core's, unchanged.
    """

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.topk == 1:
            probs = probs / torch.where(routing_map, probs.detach(), torch.ones_like(probs))
        return probs, routing_map


class MixtureOfRoutersRouter(UnitScaleTop1Mixin, TopKRouter):
    """Router Upcycling's Mixture-of-Routers: R routers (query projections of the attention
    heads they were grown from) score K expert keys; logits come from router_upcycling.mor.

    With `sum` aggregation the math computes the keys-by-hidden gate (K @ sum_r W_r) once per
    forward and applies it as a linear router; with one key per expert that is the folded N x d gate.
    With `query_norm` each head of every query goes through the attention's RMS norm first
    (`query_norm_weight`, its g_q, and the model's norm epsilon), so the queries are computed per router.
    """

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection=None,
        *,
        num_routers: int,
        num_keys: int,
        aggregation: str = "sum",
        router_scale: float = 1.0,
        query_norm: bool = False,
        **kwargs,
    ) -> None:
        # Read by reset_parameters(), which the base constructor calls.
        self.num_routers = num_routers
        self.num_keys = num_keys
        self.aggregation = aggregation
        self.router_scale = router_scale
        self.query_norm = query_norm
        self.router_dim = config.num_attention_heads * config.kv_channels // num_routers
        super().__init__(config=config, pg_collection=pg_collection, **topk_router_keywords(kwargs))

    def reset_parameters(self) -> None:
        """Replace megatron's [N, d] gate weight with the routers' queries and the expert keys."""
        self.weight = None
        self.bias = None
        config = self.config
        self.query_weight = torch.nn.Parameter(
            torch.empty(self.num_routers, self.router_dim, config.hidden_size, dtype=config.params_dtype)
        )
        self.keys = torch.nn.Parameter(torch.empty(self.num_keys, self.router_dim, dtype=config.params_dtype))
        if config.perform_initialization:
            config.init_method(self.query_weight)
            config.init_method(self.keys)
        _mark_router_parameter(self.query_weight, config)
        _mark_router_parameter(self.keys, config)
        if self.query_norm:
            self.query_norm_weight = _mark_router_parameter(
                torch.nn.Parameter(torch.ones(config.kv_channels, dtype=config.params_dtype)), config)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Expert logits [..., N] (float32) for router input [..., d]."""
        logits = mor_expert_logits(
            input.reshape(-1, input.shape[-1]).float(),
            self.query_weight.float(),
            self.keys.float(),
            self.config.num_moe_experts,
            self.aggregation,
            self.router_scale,
            self.query_norm_weight.float() if self.query_norm else None,
            self.config.layernorm_epsilon,
        )
        return logits.view(*input.shape[:-1], -1)


class MLPRouter(UnitScaleTop1Mixin, TopKRouter):
    """Two-layer MLP router (d -> d -> N, GELU, no biases), the paper's "upcycling w/ MLP router"."""

    def __init__(self, config: TransformerConfig, pg_collection=None, **kwargs) -> None:
        super().__init__(config=config, pg_collection=pg_collection, **topk_router_keywords(kwargs))

    def reset_parameters(self) -> None:
        self.weight = None
        self.bias = None
        config = self.config
        self.fc1 = torch.nn.Linear(config.hidden_size, config.hidden_size, bias=False, dtype=config.params_dtype)
        self.fc2 = torch.nn.Linear(config.hidden_size, config.num_moe_experts, bias=False, dtype=config.params_dtype)
        for layer in (self.fc1, self.fc2):
            if config.perform_initialization:
                config.init_method(layer.weight)
            _mark_router_parameter(layer.weight, config)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(F.linear(input.float(), self.fc1.weight.float()))
        return F.linear(hidden, self.fc2.weight.float())


class SwitchRouter(UnitScaleTop1Mixin, TopKRouter):
    """Switch Transformer routing: a linear gate, top-1 expert, Switch load-balancing loss
    (megatron-core's `aux_loss`); the expert scale is UnitScaleTop1Mixin's."""

    def __init__(self, config: TransformerConfig, pg_collection=None, **kwargs) -> None:
        if config.moe_router_topk != 1:
            raise ValueError(f"the switch router routes each token to 1 expert, not {config.moe_router_topk}")
        super().__init__(config=config, pg_collection=pg_collection, **topk_router_keywords(kwargs))


class LocMoERouter(UnitScaleTop1Mixin, TopKRouter):
    """LocMoE's GrAP gate (arXiv 2401.13920): logit i = ReLU(mean of the input's channel group i), no
    parameters; megatron-core's top-k, softmax over the chosen logits and load-balancing loss follow.

    Locality loss (`locality_coeff` mu > 0): mu * KL(mean routing distribution || uniform) per micro-batch, see
    router_upcycling.mor.locality_loss. With no router parameters its gradient reaches the model through the
    router input only. It is attached to the logits as megatron-core attaches its z-loss (MoEAuxLossAutoScaler)
    and logged as "locality_loss" (the KL, without mu).
    """

    def __init__(self, config: TransformerConfig, pg_collection=None, *, locality_coeff: float = 0.0, **kwargs) -> None:
        check_grap_split(config.hidden_size, config.num_moe_experts)
        self.locality_coeff = locality_coeff
        super().__init__(config=config, pg_collection=pg_collection, **topk_router_keywords(kwargs))

    def reset_parameters(self) -> None:
        """No gate weight: GrAP's pooling weights (1/g over group i) are fixed."""
        self.weight = None
        self.bias = None

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Expert logits [..., N] (float32) for router input [..., d]."""
        logits = grap_expert_logits(input.reshape(-1, input.shape[-1]).float(), self.config.num_moe_experts)
        return logits.view(*input.shape[:-1], -1)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        if self.locality_coeff > 0 and self.training and torch.is_grad_enabled():
            logits = self.apply_locality_loss(logits, padding_mask)
        return super().routing(logits, padding_mask=padding_mask)

    def apply_locality_loss(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attach mu * locality_loss to the logits [s, b, N] for the backward pass and record it for logging.

        The mean routing distribution is over the micro-batch's tokens (padding_mask [s, b], True = padding, as
        megatron-core's z-loss reads it). With sequence or context parallelism each rank holds a slice of those
        tokens: the per-expert sums are all-reduced over that group (backward: identity), so every rank computes
        the micro-batch's loss and gives its own tokens their exact gradient, whatever the layout.
        """
        flat = logits.reshape(-1, self.config.num_moe_experts)  # [T, N]
        if padding_mask is not None:
            flat = flat[~padding_mask.reshape(-1)]
        probs_sum = reduce_from_tensor_model_parallel_region(routing_distribution(flat).sum(0), group=self.tp_cp_group)
        num_tokens = torch.tensor(float(flat.shape[0]), device=flat.device)
        if self.tp_cp_group.size() > 1:
            torch.distributed.all_reduce(num_tokens, group=self.tp_cp_group)
        kl = locality_loss(probs_sum / num_tokens)
        loss = self.locality_coeff * kl
        # as megatron-core's aux losses: finalize_model_grads divides per-token losses by the token count
        logits = MoEAuxLossAutoScaler.apply(logits, loss * num_tokens if self.calculate_per_token_loss else loss)
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        save_to_aux_losses_tracker("locality_loss", kl, self.layer_number, num_layers, avg_group=self.tp_dp_cp_group)
        return logits

