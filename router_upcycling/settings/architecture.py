"""The dense model's architecture, typed: one object built from a Hugging Face config.json (or read back from a
checkpoint's metadata, which keeps that config), that every part reads instead of the raw dict.

Pure Python (no torch, no transformers), so commands check a model before any heavy import.
The family (router_upcycling.settings.families) is the one place that knows how a config.json spells
these facts, its weight names and its stock MoE target; everything else dispatches on the facts below.
"""
import dataclasses
import os
from typing import Optional

from router_upcycling.errors import UserError
from router_upcycling.files import read_json_object


class ArchitectureError(UserError):
    """A model folder or config the converter cannot read or does not support."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A dense decoder-only transformer with RoPE, RMSNorm and a SwiGLU FFN.

    head_dim need not be hidden_size / num_heads (Qwen3: 16 heads of 128 with hidden size 1024).
    rope_scaling_factor: Llama 3's frequency scaling factor (None: plain RoPE).
    """

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    norm_eps: float
    rope_theta: float
    rope_scaling_factor: Optional[float] = None

    @property
    def query_width(self) -> int:
        """H * d_h: the rows of q_proj, which the Mixture-of-Routers' query projections are cut from."""
        return self.num_heads * self.head_dim

    @property
    def heads_per_kv_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, config: dict) -> "Architecture":
        """The architecture of a dense config.json (as a dict), checked by its family; ArchitectureError if unsupported."""
        from router_upcycling.settings.families import family_of

        return family_of(config).architecture(config)


def read_hf_config(model_dir: str) -> dict:
    """A Hugging Face model folder's config.json as a dict (not yet checked for support)."""
    if os.path.isfile(model_dir):
        raise ArchitectureError(f"{model_dir} is a file; expected a Hugging Face model folder")
    if not os.path.isdir(model_dir):
        raise ArchitectureError(f"model folder not found: {model_dir}")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ArchitectureError(f"{model_dir} has no config.json (expected a Hugging Face model folder)")
    return read_json_object(path, ArchitectureError)


def read_dense_model(model_dir: str) -> "tuple[dict, Architecture]":
    """(config.json as a dict, its Architecture) of a dense Hugging Face folder; ArchitectureError when unsupported."""
    config = read_hf_config(model_dir)
    return config, Architecture.from_hf_config(config)
