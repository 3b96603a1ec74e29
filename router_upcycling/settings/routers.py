"""The routers, registered once: name, help, megatron-core class, Hugging Face gate, how `upcycle` initialises it,
whether it folds to a linear gate, and its rules (the router / expert / head counts that work).

Every part reads this table: the commands' `--router` / `--moe-router-type` choices and help, MoESettings and the
checkpoint metadata, the megatron-core layer spec, the `mor` Hugging Face config and the export. Pure Python; the
megatron-core classes and initialisers are named as "module:attribute" and imported only when used, so commands
check their settings before importing torch.

Adding a router: its math in router_upcycling/mor.py (torch only; an exported `mor` folder carries that file), its
megatron-core class in router_upcycling/mcore/routers.py (a thin TopKRouter subclass whose gating() calls the math),
its Hugging Face gate in router_upcycling/hf/modeling_mor.py, and one RouterSpec below. A router that reuses an
existing class and gate (say, the linear gate with another initialisation) is one RouterSpec alone.
"""
import dataclasses
import importlib
import math
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple, Union

from router_upcycling.errors import SettingError

if TYPE_CHECKING:
    from router_upcycling.settings.architecture import Architecture
    from router_upcycling.settings.moe import MoESettings

AGGREGATIONS = ("sum", "max")  # how a Mixture-of-Routers combines its routers' scores (method.md part 3)
GRAP_MAX_EXPERTS = 256  # the largest expert count a GrAP refusal suggests
INIT_STD = 0.02  # normal(0, std) of the routers upcycling starts at random (vanilla upcycling)

Reference = Union[str, Callable]  # "module:attribute", resolved when used, or the object itself


def resolve(reference: Reference):
    """The object a "module:attribute" reference names (imported now), or the reference itself when it is one."""
    if not isinstance(reference, str):
        return reference
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """One router.

    name: its value for `upcycle --router`, training's `--moe-router-type` and the metadata's `moe.router`.
    summary: its line in --help.
    mcore_class: the megatron-core router class (a TopKRouter), or a callable (moe) -> class.
    hf_gate: the `router_type` of the exported `mor` Hugging Face model: the gate there that computes it.
    initialise: how `upcycle` sets its weights: None = every parameter normal(0, INIT_STD), seeded per layer;
        else a callable (UpcycleContext) -> RouterInit (router_upcycling.convert.upcycle).
    needs_calibration: `initialise` reads calibration text (--calib-data).
    linear_gate: a callable (one layer's router tensors by parameter name, MoESettings) -> the [N, d] linear gate
        that routes alike, for stock exports; None when there is none (then `no_linear_gate` says why).
    no_linear_gate: why a linear gate cannot express it, or a callable (MoESettings) -> reason or None.
    top1: routes every token to one expert, whatever --topk says.
    mixture: a Mixture-of-Routers (takes num_routers, aggregation and router_scale).
    mcore_keywords: (MoESettings) -> keyword arguments of mcore_class.
    training_options: training-only keyword arguments of mcore_class (e.g. LocMoE's locality_coeff).
    check: (Architecture, MoESettings, upcycling) raises SettingError for settings it cannot follow; `upcycling`
        is True when the weights come from a dense model (`upcycle`), False for random ones (`--from-scratch`).
    """

    name: str
    summary: str
    mcore_class: Reference
    hf_gate: str
    initialise: Optional[Reference] = None
    needs_calibration: bool = False
    linear_gate: Optional[Reference] = None
    no_linear_gate: Union[str, Callable[["MoESettings"], Optional[str]]] = ""
    top1: bool = False
    mixture: bool = False
    mcore_keywords: Callable[["MoESettings"], dict] = lambda moe: {}
    training_options: Tuple[str, ...] = ()
    check: Optional[Callable[["Architecture", "MoESettings", bool], None]] = None

    def linear_gate_refusal(self, moe: "MoESettings") -> Optional[str]:
        """Why a stock (linear) gate cannot express this router with these settings, or None when it can."""
        if callable(self.no_linear_gate):
            return self.no_linear_gate(moe)
        return None if self.linear_gate is not None else (self.no_linear_gate or "it has no linear-gate form")


_REGISTRY: Dict[str, RouterSpec] = {}


def register(spec: RouterSpec) -> RouterSpec:
    """Add a router (tests add throw-away ones); its name must be new."""
    if spec.name in _REGISTRY:
        raise ValueError(f"a router named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name)


def router_names() -> List[str]:
    return list(_REGISTRY)


def get_router(name: str) -> RouterSpec:
    if name not in _REGISTRY:
        raise SettingError("router", f"{name!r} is not a router; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def routers_help() -> str:
    """One line per router for --help."""
    return "; ".join(f"{spec.name}: {spec.summary}" for spec in _REGISTRY.values())


# ---------------------------------------------------------------- the rules (router, expert and head counts)


def head_parts(num_heads: int, num_routers: int) -> int:
    """P = lcm(H, R): the query parts grouped into routers (method.md part 2). Each head is cut into P / H contiguous
    parts of its rows, so that the P parts fall into R equal groups: P = H when R divides H (whole heads, the paper's
    rule), P = R when H divides R (the paper's R > H variant), and otherwise (14 heads, R = 8: 56 parts of a quarter
    head, 7 per router) the same cut."""
    return num_heads * num_routers // math.gcd(num_heads, num_routers)


def _fits_heads(num_heads: int, head_dim: int, num_routers: int) -> bool:
    return head_dim % (head_parts(num_heads, num_routers) // num_heads) == 0


def _fits_experts(num_routers: int, num_experts: int) -> bool:
    return num_routers % num_experts == 0 or num_experts % num_routers == 0


def valid_router_counts(num_heads: int, head_dim: int, num_experts: int, limit: Optional[int] = None) -> List[int]:
    """Every router count R in 1..limit (default 4 * H) that the head-grouping rules (method.md part 2) cover."""
    limit = limit if limit is not None else 4 * num_heads
    return [r for r in range(1, limit + 1) if _fits_heads(num_heads, head_dim, r) and _fits_experts(r, num_experts)]


def check_router_count(num_heads: int, head_dim: int, num_routers: int, num_experts: int) -> None:
    """SettingError (field num_routers) unless R routers can be grown from H heads of d_h for N experts.

    Heads: each head cuts into lcm(H, R) / H equal parts of its d_h rows (head_parts).
    Experts: R == N, or one of R, N divides the other.
    """
    for name, value in (("heads", num_heads), ("head dim", head_dim), ("routers", num_routers), ("experts", num_experts)):
        if value < 1:
            raise SettingError("num_routers", f"needs at least 1 of every count: the number of {name} is {value}")
    if _fits_heads(num_heads, head_dim, num_routers) and _fits_experts(num_routers, num_experts):
        return
    working = ", ".join(map(str, valid_router_counts(num_heads, head_dim, num_experts))) or "none"
    raise SettingError(
        "num_routers",
        f"{num_routers} does not fit {num_heads} attention heads (head dim {head_dim}) with {num_experts} experts: "
        "each head is cut into lcm(heads, routers) / heads equal parts, which must divide the head dim, and the "
        f"routers must divide or be a multiple of the experts; router counts that work: {working}",
    )


def _check_mixture(arch: "Architecture", moe: "MoESettings", upcycling: bool) -> None:
    if moe.query_norm:  # the attention's per-head norm inside the routers: whole heads of a QK-norm model
        if not arch.qk_norm:
            raise SettingError("query_norm", "needs a model with query/key norms (Qwen3): its routers apply the "
                                             "attention's query norm")
        if arch.num_heads % moe.num_routers:
            working = ", ".join(str(r) for r in range(1, arch.num_heads + 1)
                                if arch.num_heads % r == 0 and _fits_experts(r, moe.num_experts)) or "none"
            raise SettingError("num_routers", f"{moe.num_routers} does not give each router whole heads of the "
                                              f"{arch.num_heads}, which the query norm inside needs (the routers must "
                                              f"divide the heads); router counts that work: {working}")
    if upcycling:
        check_router_count(arch.num_heads, arch.head_dim, moe.num_routers, moe.num_experts)
        return
    # random routers: R must still cut the query width into whole router dims and the keys over the experts
    routers, experts = moe.num_routers, moe.num_experts
    if arch.query_width % routers or max(routers, experts) % min(routers, experts):
        raise SettingError("num_routers", f"{routers} must divide the query width {arch.query_width} and be a divisor "
                                          f"or multiple of the number of experts ({experts})")


def grap_expert_counts(hidden_size: int, max_experts: int = GRAP_MAX_EXPERTS) -> List[int]:
    """Expert counts N in [2, max_experts] that cut `hidden_size` channels into equal GrAP groups."""
    return [n for n in range(2, min(hidden_size, max_experts) + 1) if hidden_size % n == 0]


def check_grap_split(hidden_size: int, num_experts: int) -> None:
    """SettingError (field num_experts), naming the expert counts that work, unless N divides d."""
    if hidden_size % num_experts:
        counts = ", ".join(map(str, grap_expert_counts(hidden_size)))
        raise SettingError("num_experts", f"{num_experts}: the LocMoE (GrAP) gate cuts the hidden size {hidden_size} "
                                          "into one equal channel group per expert, and "
                                          f"{num_experts} does not divide it; expert counts that work: {counts}")


def _check_locmoe(arch: "Architecture", moe: "MoESettings", upcycling: bool) -> None:
    check_grap_split(arch.hidden_size, moe.num_experts)


def _mixture_fold_refusal(moe: "MoESettings") -> Optional[str]:
    """Sum aggregation with one key per expert is the linear gate K @ sum_r W_r (method.md part 3)."""
    if moe.query_norm:
        return "its routers normalise each head of their queries (RMS norm), which is not linear in the input"
    if moe.aggregation != "sum":
        return f"'{moe.aggregation}' aggregation over routers is not linear in the input"
    if moe.num_keys != moe.num_experts:
        return f"experts hold {moe.num_keys // moe.num_experts} keys each and take the max over them"
    return None


def _mixture_keywords(moe: "MoESettings") -> dict:
    return {"num_routers": moe.num_routers, "num_keys": moe.num_keys, "aggregation": moe.aggregation,
            "router_scale": moe.router_scale, "query_norm": moe.query_norm}


def _linear_class(moe: "MoESettings"):
    # megatron-core's own router; top-1 linear routing is exactly the switch router (unit expert scale)
    return resolve(SWITCH.mcore_class) if moe.topk == 1 else resolve("megatron.core.transformer.moe.router:TopKRouter")


MOR = register(RouterSpec(
    name="mor",
    summary="Mixture-of-Routers initialised from the attention heads (Router Upcycling; needs --calib-data)",
    mcore_class="router_upcycling.mcore.routers:MixtureOfRoutersRouter",
    hf_gate="mor",
    initialise="router_upcycling.convert.upcycle:routers_from_attention",
    needs_calibration=True,
    linear_gate="router_upcycling.convert.hf_export:mixture_linear_gate",
    no_linear_gate=_mixture_fold_refusal,
    mixture=True,
    mcore_keywords=_mixture_keywords,
    check=_check_mixture,
))
LINEAR = register(RouterSpec(
    name="linear",
    summary="random linear gate (vanilla upcycling)",
    mcore_class=_linear_class,
    hf_gate="linear",
    linear_gate="router_upcycling.convert.hf_export:weight_linear_gate",
))
MLP = register(RouterSpec(
    name="mlp",
    summary="2-layer GELU MLP d -> d -> N",
    mcore_class="router_upcycling.mcore.routers:MLPRouter",
    hf_gate="mlp",
    no_linear_gate="the mlp router is a 2-layer GELU network",
))
SWITCH = register(RouterSpec(
    name="switch",
    summary="top-1 Switch router (linear gate, Switch load-balancing loss)",
    mcore_class="router_upcycling.mcore.routers:SwitchRouter",
    hf_gate="switch",
    linear_gate="router_upcycling.convert.hf_export:weight_linear_gate",
    top1=True,
))
LOCMOE = register(RouterSpec(
    name="locmoe",
    summary="LocMoE's parameter-free GrAP gate (the hidden size must be a multiple of the number of experts; its "
            "locality loss is the training flag --locmoe-locality-coeff)",
    mcore_class="router_upcycling.mcore.routers:LocMoERouter",
    hf_gate="locmoe",
    no_linear_gate="its GrAP gate takes the ReLU of channel-group means, and ReLU is not linear",
    training_options=("locality_coeff",),
    check=_check_locmoe,
))
DEFAULT_ROUTER = MOR.name
BASELINE_ROUTER = LINEAR.name  # vanilla upcycling, and the from-scratch default
