"""The Hugging Face `mor` model (config and modeling), loadable from an exported folder with transformers alone."""
from .configuration_mor import Qwen2MoRConfig
from .modeling_mor import Qwen2MoRForCausalLM, Qwen2MoRModel

__all__ = ["Qwen2MoRConfig", "Qwen2MoRForCausalLM", "Qwen2MoRModel"]
