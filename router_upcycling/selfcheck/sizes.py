"""The model sizes the self-check measures, and the training settings it measures them with.

Sizes (each upcycled to 8 experts, top-2, 8 Mixture-of-Routers routers, `sum` aggregation):
    tiny   d 64, 2 layers, 8 heads, FFN 96, vocab 512: seconds per stage on a CPU
    0.5b   Qwen1.5-0.5B's shape: d 1024, 24 layers, 16 heads, FFN 2816, vocab 151936, tied embeddings
    1.8b   Qwen1.5-1.8B's shape: d 2048, 24 layers, 16 heads, FFN 5504, vocab 151936

Training settings are the 8x0.5B recipe's (configs/train/qwen1.5_8x0.5b_mor.yaml): bf16, Transformer Engine
layers, grouped GEMM, distributed optimizer, gradient reduction and parameter gathering overlapped, sequence 4096,
micro-batch 4, 4 micro-batches per step. Where Transformer Engine does not import (always on a CPU) the local
layers run without grouped GEMM, and the report says so.
"""
import dataclasses
from typing import Dict, List, Tuple

from router_upcycling.mcore.parallel import transformer_engine_available
from router_upcycling.resources import resource_path
from router_upcycling.settings.architecture import Architecture
from router_upcycling.settings.moe import MoESettings
from router_upcycling.settings.routers import BASELINE_ROUTER, DEFAULT_ROUTER
from router_upcycling.testing import tiny_qwen2_config
from router_upcycling.train.config import TrainingConfig

RECIPE = "configs/train/qwen1.5_8x0.5b_mor.yaml"
# the recipe's gradient accumulation: a global batch of 1024 = 4 micro-batches of 4 on each of 64 GPUs
MICRO_BATCHES_PER_STEP = 4
# the measured model's MoE settings and those of its linear-router baseline
MOR = MoESettings(num_experts=8, topk=2, router=DEFAULT_ROUTER, num_routers=8, aggregation="sum")
LINEAR = MoESettings(num_experts=8, topk=2, router=BASELINE_ROUTER)


@dataclasses.dataclass(frozen=True)
class Size:
    shape: Dict  # router_upcycling.testing.tiny_qwen2_config's arguments
    train_flags: Tuple[str, ...] = ()  # training flags over the recipe's (tiny: a CPU-sized batch)
    calib_tokens: int = 262144  # timed calibration tokens: 4 batches of 16 x 4096 on a GPU
    calib_seq_length: int = 4096

    def qwen2_config(self):
        return tiny_qwen2_config(**self.shape)

    @property
    def hf_config(self) -> dict:
        return self.qwen2_config().to_dict()

    @property
    def arch(self) -> Architecture:
        return Architecture.from_hf_config(self.hf_config)


SIZES = {
    "tiny": Size(dict(hidden_size=64, num_layers=2, num_heads=8, intermediate_size=96, vocab_size=512),
                 ("--seq-length", "128", "--micro-batch-size", "2"), calib_tokens=2048, calib_seq_length=128),
    "0.5b": Size(dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=2816, vocab_size=151936,
                      tied=True, max_position_embeddings=32768)),
    "1.8b": Size(dict(hidden_size=2048, num_layers=24, num_heads=16, intermediate_size=5504, vocab_size=151936,
                      tied=False, max_position_embeddings=32768)),
}


def recipe_training_config(size: Size, data_parallel_size: int) -> Tuple[TrainingConfig, List[str]]:
    """The recipe's training settings for timing `size` on this machine, and a note for each recipe option it cannot run."""
    from router_upcycling.train.config import build_parser, config_defaults

    parser = build_parser()
    parser.set_defaults(**config_defaults(parser, str(resource_path(RECIPE))))
    config = TrainingConfig.from_namespace(parser.parse_args(["--train-iters", "1", *size.train_flags]))
    config = config.replace(global_batch_size=config.micro_batch_size * MICRO_BATCHES_PER_STEP * data_parallel_size)
    notes = []
    if config.transformer_impl == "transformer_engine" and not transformer_engine_available():
        config = config.replace(transformer_impl="local", moe_grouped_gemm=False)
        notes.append("Transformer Engine does not import here: local layers without grouped GEMM")
    return config.on_this_machine(), notes


def speed_options(config: TrainingConfig) -> dict:
    """The settings that decide a step's speed, as the report lists them."""
    names = ("bf16", "transformer_impl", "moe_grouped_gemm", "use_distributed_optimizer", "overlap_grad_reduce",
             "overlap_param_gather", "moe_token_dispatcher_type", "seq_length", "micro_batch_size")
    return {**{name: getattr(config, name) for name in names}, "micro_batches_per_step": MICRO_BATCHES_PER_STEP}
