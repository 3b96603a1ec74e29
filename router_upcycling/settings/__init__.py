"""Typed settings every part reads: the dense architecture and its family, the routers' registry, the MoE settings.

Pure Python (no torch, megatron-core or transformers), so a command checks what it was given in well under a
second, before any heavy import.
"""
from router_upcycling.settings.architecture import Architecture, ArchitectureError, read_dense_model, read_hf_config
from router_upcycling.settings.families import FAMILIES, Family, family_of
from router_upcycling.settings.moe import MoESettings
from router_upcycling.settings.routers import RouterSpec, get_router, router_names

__all__ = ["Architecture", "ArchitectureError", "FAMILIES", "Family", "MoESettings", "RouterSpec", "family_of",
           "get_router", "read_dense_model", "read_hf_config", "router_names"]
