"""Router initialisation from attention: head grouping, calibration (average keys), key-to-expert rules."""
from router_upcycling.init.calibration import average_attention_keys, default_batch_size
from router_upcycling.init.grouping import group_heads, head_keys_from_kv, router_weights_from_attention, split_query_heads
from router_upcycling.init.routers import init_routers_from_attention

__all__ = [
    "average_attention_keys",
    "default_batch_size",
    "group_heads",
    "head_keys_from_kv",
    "init_routers_from_attention",
    "router_weights_from_attention",
    "split_query_heads",
]
