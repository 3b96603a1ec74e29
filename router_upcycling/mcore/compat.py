"""What differs between the megatron-core releases we support (0.16.1 on Python >= 3.10, through 0.19.x
on Python >= 3.12). Every version difference the package meets lives here, one function each, with the
release that changed it; nothing else checks megatron-core's version.
"""
import functools
import inspect

from megatron.core.transformer.moe.router import TopKRouter


def moe_submodules(layer_spec):
    """The MoESubmodules of a GPT layer spec's MoE block (where the router and experts are chosen).

    0.16-0.17: the block is `ModuleSpec(module=MoELayer, submodules=MoESubmodules(...))`.
    0.18+: the spec functions return `functools.partial(MoELayer, submodules=MoESubmodules(...))`.
    """
    mlp = layer_spec.submodules.mlp
    if isinstance(mlp, functools.partial):
        return mlp.keywords["submodules"]
    return mlp.submodules


def topk_router_keywords(kwargs: dict) -> dict:
    """The keywords this megatron-core's TopKRouter takes, of those its MoELayer passes a router.

    0.17+: MoELayer builds the router with `is_mtp_layer=...`, which TopKRouter takes; 0.16 passes and takes
    neither. Our routers forward what TopKRouter knows and drop the rest, so a newer MoELayer cannot break
    them at construction.
    """
    parameters = inspect.signature(TopKRouter.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return kwargs
    return {key: value for key, value in kwargs.items() if key in parameters}
