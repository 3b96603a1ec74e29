"""The Hugging Face `mor` model (config and modeling), loadable from an exported folder with transformers alone.

The classes are imported when first asked for (`from router_upcycling.hf import Qwen2MoRConfig`), so that
`router_upcycling.hf.loading` does not import transformers.
"""
import importlib

_CLASSES = {"Qwen2MoRConfig": "configuration_mor", "Qwen2MoRForCausalLM": "modeling_mor", "Qwen2MoRModel": "modeling_mor"}

__all__ = list(_CLASSES)


def __getattr__(name):
    if name in _CLASSES:
        return getattr(importlib.import_module(f"{__name__}.{_CLASSES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
