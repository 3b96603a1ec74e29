"""Where a run's architecture, first weights and tokenizer come from, and the checks of the settings against that
model. Pure Python: a run with a wrong model or router is refused before torch and megatron-core are imported."""
import dataclasses
import os
from typing import Optional

from router_upcycling.checkpoint_folder import (
    RELEASE, TOKENIZER_DIR, CheckpointError, holds_training_checkpoint, read_checkpoint_settings, resolve_iteration_dir,
    tracked_training_iteration,
)
from router_upcycling.errors import SettingError
from router_upcycling.settings.architecture import Architecture, read_dense_model
from router_upcycling.settings.moe import MoESettings
from router_upcycling.train.config import TrainError, TrainingConfig, flag_of
from router_upcycling.train.indexed import check_token_ids

# MoESettings' fields and the training flags that set them (--from-scratch)
MOE_FLAGS = {"num_experts": "--num-experts", "topk": "--moe-router-topk", "router": "--moe-router-type",
             "num_routers": "--num-routers"}


@dataclasses.dataclass
class ModelSource:
    """Where the architecture, the first weights and the tokenizer come from."""

    metadata: dict  # router_upcycling.json contents (docs/checkpoint-format.md)
    arch: Architecture
    moe: MoESettings
    weights_dir: Optional[str]  # an iteration folder to load weights from; None = random init
    tokenizer_dir: str
    resume_dir: Optional[str]  # --load holds a training checkpoint: resume everything from it

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str, resume: bool) -> "ModelSource":
        """A training checkpoint to resume (`resume`), or an upcycled one whose weights start the run."""
        metadata, arch, moe = read_checkpoint_settings(checkpoint_dir)
        weights_dir = None if resume else resolve_iteration_dir(checkpoint_dir)
        return cls(metadata, arch, moe, weights_dir, os.path.join(checkpoint_dir, TOKENIZER_DIR),
                   checkpoint_dir if resume else None)


def from_scratch(config: TrainingConfig) -> ModelSource:
    """The paper's "MoE from scratch": the dense architecture of --model-config, random weights."""
    hf_config, arch = read_dense_model(config.model_config)
    try:
        moe = MoESettings(num_experts=config.num_experts, topk=config.moe_router_topk, router=config.moe_router_type,
                          num_routers=config.num_routers)
        moe.check(arch, upcycling=False)
    except SettingError as err:
        raise TrainError(str(err.as_flag(MOE_FLAGS))) from None
    metadata = {"hf_config": hf_config, "moe": moe.to_dict(arch), "source_model": os.path.abspath(config.model_config),
                "calibration": None, "init": "from_scratch", "dtype": "bf16" if config.bf16 else "fp32",
                "training": {"iteration": 0, "consumed_tokens": 0}}
    return ModelSource(metadata, arch, moe, None, config.model_config, None)


def resolve_model_source(config: TrainingConfig) -> ModelSource:
    """Resume from --load when it holds a training checkpoint, else start from the pretrained checkpoint or from
    scratch; the settings and the data's token ids are then checked against that model."""
    load = config.load
    if load and holds_training_checkpoint(load):
        # the newest readable iteration is found when loading (train.checkpointing: a damaged one is skipped)
        source = ModelSource.from_checkpoint(load, resume=True)
    else:
        upcycled = load and tracked_training_iteration(load)[0] == RELEASE
        pretrained = config.pretrained_checkpoint or (load if upcycled else None)
        if pretrained:
            source = ModelSource.from_checkpoint(pretrained, resume=False)
        elif config.from_scratch:
            source = from_scratch(config)
        else:
            raise CheckpointError(f"--load {load} holds no checkpoint; add --pretrained-checkpoint or --from-scratch "
                                  "to start a run")
    check_fits_model(config, source)
    check_token_ids(config.data_path, source.arch.vocab_size)
    return source


def check_fits_model(config: TrainingConfig, source: ModelSource) -> None:
    """The parallel sizes must split the model evenly (megatron-core asserts; these are one-line errors), and
    router-specific training flags must match the model's router."""
    arch, moe = source.arch, source.moe
    tp, pp, ep = config.tensor_model_parallel_size, config.pipeline_model_parallel_size, config.expert_model_parallel_size
    if arch.num_layers % pp:
        raise TrainError(f"--pipeline-model-parallel-size {pp} must divide the number of layers ({arch.num_layers})")
    if moe.num_experts % ep:
        raise TrainError(f"--expert-model-parallel-size {ep} must divide the number of experts ({moe.num_experts})")
    sizes = {"attention heads": arch.num_heads, "key/value heads": arch.num_kv_heads,
             "FFN width": arch.ffn_hidden_size, "vocabulary": arch.vocab_size}
    for what, size in sizes.items():
        if size % tp:
            raise TrainError(f"--tensor-model-parallel-size {tp} must divide the number of {what} ({size})")
    if config.seq_length > arch.max_position_embeddings:  # Megatron-LM refuses it alike
        raise TrainError(f"--seq-length {config.seq_length} is longer than the model's {arch.max_position_embeddings} "
                         "positions (max_position_embeddings of its config)")
    options = training_router_options(config)
    for name, value in options.items():
        if value and name not in moe.spec.training_options:
            flag = flag_of(ROUTER_OPTION_FIELDS[name])
            raise TrainError(f"{flag} applies to the {' / '.join(_routers_taking(name))} router only; this model's "
                             f"router is {moe.router}")


# the training-only router options (RouterSpec.training_options) and the TrainingConfig fields that set them
ROUTER_OPTION_FIELDS = {"locality_coeff": "locmoe_locality_coeff"}


def training_router_options(config: TrainingConfig) -> dict:
    return {option: getattr(config, field) for option, field in ROUTER_OPTION_FIELDS.items()}


def _routers_taking(option: str) -> list:
    from router_upcycling.settings.routers import get_router, router_names

    return [name for name in router_names() if option in get_router(name).training_options]
