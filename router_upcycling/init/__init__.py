"""Router initialisation from attention: head grouping, calibration (average keys), key-to-expert rules."""
from router_upcycling.init.calibration import average_attention_keys, default_batch_size
from router_upcycling.init.grouping import (
    RouterCountError,
    check_router_count,
    group_heads,
    head_keys_from_kv,
    router_weights_from_attention,
    split_query_heads,
    valid_router_counts,
)
from router_upcycling.init.routers import init_routers_from_attention

__all__ = [
    "RouterCountError",
    "average_attention_keys",
    "check_router_count",
    "default_batch_size",
    "group_heads",
    "head_keys_from_kv",
    "init_routers_from_attention",
    "router_weights_from_attention",
    "split_query_heads",
    "valid_router_counts",
]
