"""The layer spec of our MoE (its router and architecture from a checkpoint's metadata) for Megatron-LM's `--spec`.

    pretrain_gpt.py ... --spec router_upcycling.megatron_lm.spec layer_spec --load CKPT (or --pretrained-checkpoint CKPT)

Megatron-LM (megatron-core >= 0.17) calls `layer_spec` with its GPTModelConfig when it builds each model stage. The
checkpoint whose router this builds is, in this order: $ROUTER_UPCYCLING_CHECKPOINT, else --load when it holds our
metadata (router_upcycling.json), else --pretrained-checkpoint. Before a layer is built the run's architecture is
compared with the checkpoint's: a flag that disagrees (a missing --add-qkv-bias, a wrong --num-query-groups) stops
the run with one message naming it, rather than loading weights into a different model.
"""
import os
from typing import Optional, Tuple

from router_upcycling.checkpoint_folder import (
    ARGS_METADATA, METADATA_FILE, TOKENIZER_DIR, read_checkpoint_settings,
)
from router_upcycling.errors import UserError
from router_upcycling.megatron_lm.flags import mismatched_flags, refusal
from router_upcycling.settings.architecture import Architecture
from router_upcycling.settings.moe import MoESettings

CHECKPOINT_ENV = "ROUTER_UPCYCLING_CHECKPOINT"


class SpecError(UserError):
    """The run's flags or checkpoint cannot give our layer spec."""


def settings_checkpoint(args) -> Optional[str]:
    """The folder whose metadata names the router: $ROUTER_UPCYCLING_CHECKPOINT, --load, --pretrained-checkpoint."""
    candidates = [os.environ.get(CHECKPOINT_ENV), getattr(args, "load", None), getattr(args, "pretrained_checkpoint", None)]
    for folder in candidates:
        if folder and os.path.isfile(os.path.join(folder, METADATA_FILE)):
            return folder
    return None


def checkpoint_settings(args) -> Tuple[str, dict, Architecture, MoESettings]:
    folder = settings_checkpoint(args)
    if folder is None:
        raise SpecError(f"the router_upcycling layer spec needs one of our checkpoints (a folder with {METADATA_FILE}): "
                        f"pass --load or --pretrained-checkpoint, or set {CHECKPOINT_ENV}")
    metadata, arch, moe = read_checkpoint_settings(folder)
    return folder, metadata, arch, moe


def router_options(args, moe: MoESettings) -> dict:
    """Training-only router settings the launcher's flags carry (LocMoE's locality coefficient)."""
    coeff = getattr(args, "locmoe_locality_coeff", 0.0) or 0.0
    return {"locality_coeff": coeff} if "locality_coeff" in moe.spec.training_options else {}


def remember_settings(args, folder: str, metadata: dict) -> None:
    """Keep our metadata in Megatron-LM's `args`, which it saves with every checkpoint: `export`, `verify` and our
    trainer then read a --save folder that has no router_upcycling.json (the tokenizer: the source checkpoint's)."""
    metadata = {key: value for key, value in metadata.items() if key not in ("format_version", "training")}
    if os.path.isdir(os.path.join(folder, TOKENIZER_DIR)):
        metadata["tokenizer_dir"] = os.path.abspath(os.path.join(folder, TOKENIZER_DIR))
    setattr(args, ARGS_METADATA, metadata)


def layer_spec(config, vp_stage: Optional[int] = None):
    """Megatron-LM's `--spec` callable: the decoder block of this stage (our router, local or Transformer Engine
    layers as --transformer-impl says), after checking the run's architecture against the checkpoint's."""
    from megatron.training import get_args

    from router_upcycling.mcore.model import decoder_block_spec

    args = get_args()
    folder, metadata, arch, moe = checkpoint_settings(args)
    problems = mismatched_flags(args, arch, moe)
    if problems:
        raise SpecError(refusal(problems, folder))
    remember_settings(args, folder, metadata)
    transformer = getattr(config, "transformer", config)
    use_te = getattr(args, "transformer_impl", "local") == "transformer_engine"
    return decoder_block_spec(transformer, moe, use_te, vp_stage=vp_stage, **router_options(args, moe))
