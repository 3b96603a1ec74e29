"""Tiny Qwen2-architecture models and tokenizers built locally, for tests, examples and benchmarks.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on a few sentences and
the model weights are random (or given).
"""
import dataclasses
import os
import tempfile
from typing import Iterable, Optional

import torch

SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "12 + 30 = 42; 7 * 6 = 42; 84 / 2 = 42.",
    "Router upcycling initialises mixture-of-experts routers from attention heads.",
    "In 1905 Einstein published four papers on physics.",
    "import torch\nx = torch.randn(4, 8)\nprint(x.sum())\n",
]


def train_tokenizer(texts: Optional[Iterable[str]] = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer wrapped as Qwen2TokenizerFast (EOS = pad = <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, Qwen2TokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts or SAMPLE_TEXT) * 4, trainer)
    wrapped = Qwen2TokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token=None)
    # transformers 5 gives a Qwen2 tokenizer Qwen2's own pre-tokenizer when it is loaded from disk: return
    # the tokenizer as every tool will load it, so ids made in memory match ids made from the saved files
    with tempfile.TemporaryDirectory() as folder:
        wrapped.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder)


def tiny_qwen2_config(
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 8,
    num_kv_heads: Optional[int] = None,
    intermediate_size: int = 96,
    tied: bool = True,
    max_position_embeddings: int = 256,
):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=None,
        torch_dtype="float32",
    )


def qwen2_architecture(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 8, vocab_size: int = 512,
                       intermediate_size: Optional[int] = None, num_kv_heads: Optional[int] = None):
    """The typed Architecture of a Qwen2 model of these sizes (tied embeddings), without building one."""
    from router_upcycling.settings.architecture import Architecture

    return Architecture(
        family="qwen2", num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
        num_kv_heads=num_kv_heads or num_heads, head_dim=hidden_size // num_heads,
        ffn_hidden_size=intermediate_size or hidden_size * 11 // 4, vocab_size=vocab_size, max_position_embeddings=4096,
        tie_embeddings=True, qkv_bias=True, qk_norm=False, norm_eps=1e-6, rope_theta=10000.0,
    )


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The attention geometry of a published dense checkpoint: what Router Upcycling's head grouping, the converter's
    weight tables and the RoPE depend on. Test models keep it exactly and shrink the rest (2 layers, a small FFN and
    vocabulary)."""

    family: str  # qwen2 | qwen3 | llama
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied: bool
    rope_theta: float = 1e6
    llama3_rope_factor: Optional[float] = None  # Llama 3's RoPE scaling (factor; the others are Llama 3's own)


# published checkpoints' config.json values (their hidden sizes, heads, KV heads, head dims, tying and RoPE)
PUBLISHED_GEOMETRIES = {
    "Qwen1.5-0.5B": Geometry("qwen2", 1024, 16, 16, 64, tied=True),
    "Qwen1.5-1.8B": Geometry("qwen2", 2048, 16, 16, 128, tied=False),
    "Qwen2.5-0.5B": Geometry("qwen2", 896, 14, 2, 64, tied=True),
    "Qwen2.5-1.5B": Geometry("qwen2", 1536, 12, 2, 128, tied=True),
    "Qwen2.5-3B": Geometry("qwen2", 2048, 16, 2, 128, tied=True),
    "Qwen2.5-7B": Geometry("qwen2", 3584, 28, 4, 128, tied=False),
    "Qwen3-0.6B": Geometry("qwen3", 1024, 16, 8, 128, tied=True),
    "Qwen3-1.7B": Geometry("qwen3", 2048, 16, 8, 128, tied=True),
    "Qwen3-4B": Geometry("qwen3", 2560, 32, 8, 128, tied=True),
    "Qwen3-8B": Geometry("qwen3", 4096, 32, 8, 128, tied=False),
    "Llama-3.2-1B": Geometry("llama", 2048, 32, 8, 64, tied=True, rope_theta=500000.0, llama3_rope_factor=32.0),
    "Llama-3.2-3B": Geometry("llama", 3072, 24, 8, 128, tied=True, rope_theta=500000.0, llama3_rope_factor=32.0),
    "Llama-3.1-8B": Geometry("llama", 4096, 32, 8, 128, tied=False, rope_theta=500000.0, llama3_rope_factor=8.0),
}


def dense_config(family: str, vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 8,
                 num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None, intermediate_size: int = 96,
                 tied: bool = True, max_position_embeddings: int = 256, rope_theta: float = 10000.0,
                 llama3_rope_factor: Optional[float] = None):
    """A Hugging Face config of a dense model of `family` (qwen2, qwen3, llama) with these sizes."""
    import transformers

    from router_upcycling.settings.families import LLAMA3_FIXED, family_named

    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if llama3_rope_factor is not None:
        rope = {"rope_type": "llama3", "factor": llama3_rope_factor, "rope_theta": rope_theta,
                **{key: value for key, value in LLAMA3_FIXED.items()}}
        max_position_embeddings = max(max_position_embeddings, 131072)  # Llama 3's; past the original 8192
    config_class = getattr(transformers, family_named(family).hf_architectures[0].replace("ForCausalLM", "Config"))
    config = config_class(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
        head_dim=head_dim or hidden_size // num_heads, max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6, rope_parameters=rope, tie_word_embeddings=tied, eos_token_id=0, pad_token_id=0,
        bos_token_id=None, torch_dtype="float32",
    )
    config.architectures = list(family_named(family).hf_architectures[:1])
    return config


def make_dense_model(output_dir: str, geometry: Geometry, seed: int = 0, tokenizer=None, intermediate_size: int = 64,
                     **config_kwargs) -> str:
    """Write a 2-layer random dense model with a published checkpoint's attention geometry, and its tokenizer.

    Weights are normal(0, 0.08 * sqrt(64 / hidden size)): the scale make_dense_qwen2 uses at hidden size 64, kept for
    wider models so that activations and logits stay in the same range.
    """
    import transformers

    from router_upcycling.settings.families import family_named

    tokenizer = tokenizer or train_tokenizer()
    config = dense_config(
        geometry.family, vocab_size=-(-len(tokenizer) // 128) * 128, hidden_size=geometry.hidden_size,
        num_heads=geometry.num_heads, num_kv_heads=geometry.num_kv_heads, head_dim=geometry.head_dim,
        intermediate_size=intermediate_size, tied=geometry.tied, rope_theta=geometry.rope_theta,
        llama3_rope_factor=geometry.llama3_rope_factor, **config_kwargs,
    )
    model_class = getattr(transformers, family_named(geometry.family).hf_architectures[0])
    torch.manual_seed(seed)
    return _save_randomized(model_class(config), tokenizer, output_dir, 0.08 * (64 / geometry.hidden_size) ** 0.5)


def make_dense_qwen2(output_dir: str, seed: int = 0, std: float = 0.08, tokenizer=None, **config_kwargs) -> str:
    """Write a tiny random Qwen2ForCausalLM (float32 safetensors) and its tokenizer to output_dir.

    Weights get a larger std than the usual 0.02 and random q/k/v biases so that attention heads,
    average keys and logits are far from degenerate.
    """
    from transformers import Qwen2ForCausalLM

    tokenizer = tokenizer or train_tokenizer()
    # rows past the tokenizer's size are padding, as in Qwen's own checkpoints; a multiple of 128
    # keeps the vocabulary divisible by any tensor-parallel size
    config_kwargs.setdefault("vocab_size", -(-len(tokenizer) // 128) * 128)
    config = tiny_qwen2_config(**config_kwargs)
    torch.manual_seed(seed)
    return _save_randomized(Qwen2ForCausalLM(config), tokenizer, output_dir, std)


def _save_randomized(model, tokenizer, output_dir: str, std: float) -> str:
    """Norm weights near 1, a disabled shared-expert gate at 0, every other weight normal(0, std); then save."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "shared_expert_gate" in name:
                param.zero_()
            elif "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, std)
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def make_tiny_qwen2_moe(output_dir: str, seed: int = 0, num_experts: int = 4, top_k: int = 2, std: float = 0.08,
                        tokenizer=None, num_layers: int = 2, hidden_size: int = 64, intermediate_size: int = 48,
                        num_heads: int = 4, norm_topk_prob: bool = True, max_position_embeddings: int = 256) -> str:
    """Write a tiny random stock Qwen2MoeForCausalLM (float32, no shared expert) and its tokenizer.

    The shared expert is disabled (`shared_expert_intermediate_size=0`); its zero-size tensors
    and a zero gate are saved so that loading reports nothing missing.
    """
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    tokenizer = tokenizer or train_tokenizer()
    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        moe_intermediate_size=intermediate_size, shared_expert_intermediate_size=0, num_experts=num_experts,
        num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads, max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=0, pad_token_id=0, bos_token_id=None,
        decoder_sparse_step=1, mlp_only_layers=[], torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return _save_randomized(Qwen2MoeForCausalLM(config), tokenizer, output_dir, std)


def write_token_documents(prefix: str, num_docs: int = 200, seed: int = 0) -> None:
    """A megatron-core indexed dataset (PREFIX.bin/.idx) of short arithmetic token sequences (learnable),
    each ended by EOD (id 0), for training runs without a tokenizer pass."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(num_docs):
        length, start, stride = int(rng.integers(10, 80)), int(rng.integers(1, 200)), int(rng.integers(1, 5))
        builder.add_item(torch.tensor([(start + i * stride) % 200 + 1 for i in range(length)] + [0]))
        builder.end_document()
    builder.finalize(prefix + ".idx")
