"""The mixture-of-experts settings of a model: experts, top-k and the router (the "moe" block of a checkpoint's
metadata, docs/checkpoint-format.md). Pure Python; the router's rules come from the registry."""
import dataclasses
from typing import TYPE_CHECKING, Optional

from router_upcycling.errors import SettingError
from router_upcycling.settings.routers import AGGREGATIONS, DEFAULT_ROUTER, RouterSpec, get_router

if TYPE_CHECKING:
    from router_upcycling.settings.architecture import Architecture


@dataclasses.dataclass
class MoESettings:
    """Experts per layer, experts per token and the router; `num_routers`, `aggregation`, `router_scale` and
    `query_norm` apply to a Mixture-of-Routers (num_routers defaults to num_experts there). A top-1 router (switch)
    sets topk to 1. `query_norm`: the routers normalise each head of their queries with the attention's query norm
    (QK-norm models, `upcycle --router-qk-norm inside`; docs/method.md part 2).

    Invalid values raise SettingError naming the field; each command words it with its own flag.
    """

    num_experts: int = 8
    topk: int = 2
    router: str = DEFAULT_ROUTER
    num_routers: Optional[int] = None
    aggregation: str = "sum"
    router_scale: float = 1.0
    query_norm: bool = False

    def __post_init__(self):
        spec = get_router(self.router)
        if self.aggregation not in AGGREGATIONS:
            raise SettingError("aggregation", f"{self.aggregation!r} is not a router aggregation; choose "
                                              f"{' or '.join(AGGREGATIONS)}")
        if spec.top1:
            self.topk = 1
        if spec.mixture and self.num_routers is None:
            self.num_routers = self.num_experts
        if not self.router_scale > 0:
            raise SettingError("router_scale", f"must be positive, got {self.router_scale}")
        if self.num_experts < 1:
            raise SettingError("num_experts", f"must be at least 1, got {self.num_experts}")
        if not 1 <= self.topk <= self.num_experts:
            raise SettingError("topk", f"must be between 1 and the number of experts ({self.num_experts}), got {self.topk}")
        if spec.mixture and self.num_routers < 1:
            raise SettingError("num_routers", f"must be at least 1, got {self.num_routers}")
        if self.query_norm and not spec.mixture:
            raise SettingError("query_norm", f"applies to a Mixture-of-Routers, not the {self.router} router")

    @property
    def spec(self) -> RouterSpec:
        return get_router(self.router)

    @property
    def num_keys(self) -> Optional[int]:
        """K = max(R, N), the expert keys per layer of a Mixture-of-Routers (method.md part 2); None for other routers."""
        return max(self.num_routers, self.num_experts) if self.spec.mixture else None

    def router_dim(self, arch: "Architecture") -> Optional[int]:
        """d_r = H * d_h / R of a Mixture-of-Routers; None for other routers."""
        return arch.query_width // self.num_routers if self.spec.mixture else None

    def check(self, arch: "Architecture", upcycling: bool) -> None:
        """SettingError unless the router's rules fit this architecture (the registry's check)."""
        if self.spec.check:
            self.spec.check(arch, self, upcycling)

    def to_dict(self, arch: "Architecture") -> dict:
        """The metadata block, with the derived router sizes spelled out for readers."""
        block = dataclasses.asdict(self)
        if self.spec.mixture:
            block["router_dim"] = self.router_dim(arch)
            block["num_keys"] = self.num_keys
        return block

    @classmethod
    def from_dict(cls, block: dict) -> "MoESettings":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in block.items() if k in fields})
