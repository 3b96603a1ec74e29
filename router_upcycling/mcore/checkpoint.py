"""Megatron checkpoint folders (docs/checkpoint-format.md): metadata, tracker, torch_dist I/O.

A folder holds `router_upcycling.json` (architecture + router settings), `tokenizer/`, one
sub-folder per saved iteration (`release` or `iter_0000100`) and the tracker
`latest_checkpointed_iteration.txt`, which is written last so a half-written checkpoint is
never the one loaded.
"""
import json
import os
import shutil
from typing import Optional

import torch

from router_upcycling.errors import UserError

METADATA_FILE = "router_upcycling.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
TOKENIZER_DIR = "tokenizer"
RELEASE = "release"
FORMAT_VERSION = 1
# the metadata's "dtype" (and the converter's --dtype) names the stored weights' precision
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class CheckpointError(UserError):
    """A checkpoint folder that is missing, incomplete or not ours."""


def iteration_dir_name(iteration) -> str:
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


def read_metadata(checkpoint_dir: str) -> dict:
    path = os.path.join(checkpoint_dir, METADATA_FILE)
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f"checkpoint folder not found: {checkpoint_dir}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{checkpoint_dir} is not a Router Upcycling checkpoint (no {METADATA_FILE})")
    with open(path) as f:
        return json.load(f)


def write_metadata(checkpoint_dir: str, metadata: dict) -> None:
    metadata = {"format_version": FORMAT_VERSION, **metadata}
    with open(os.path.join(checkpoint_dir, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2, sort_keys=False)


def copy_tokenizer(source_dir: str, checkpoint_dir: str) -> None:
    """Copy the tokenizer files of an HF folder (or a checkpoint's tokenizer/) into checkpoint_dir/tokenizer."""
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "added_tokens.json", "generation_config.json", "chat_template.jinja")
    target = os.path.join(checkpoint_dir, TOKENIZER_DIR)
    os.makedirs(target, exist_ok=True)
    for name in names:
        if os.path.isfile(os.path.join(source_dir, name)):
            shutil.copy2(os.path.join(source_dir, name), os.path.join(target, name))


def read_tracker(checkpoint_dir: str) -> Optional[str]:
    """The iteration named by the tracker ("release" or a number as text), None when absent."""
    path = os.path.join(checkpoint_dir, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def write_tracker(checkpoint_dir: str, iteration) -> None:
    """Atomically point the tracker at a complete checkpoint."""
    path = os.path.join(checkpoint_dir, TRACKER_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(str(iteration))
    os.replace(path + ".tmp", path)


def resolve_iteration_dir(checkpoint_dir: str, iteration=None) -> str:
    """The folder of the requested iteration, or of the latest complete one."""
    if iteration is None:
        iteration = read_tracker(checkpoint_dir)
        if iteration is None:
            raise CheckpointError(f"{checkpoint_dir} holds no complete checkpoint (no {TRACKER_FILE})")
    path = os.path.join(checkpoint_dir, iteration_dir_name(iteration))
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise CheckpointError(f"checkpoint {path} is missing or incomplete")
    return path


def share_view_copies(sharded_state_dict: dict) -> None:
    """Give CPU tensors that are views (e.g. the gate and up halves megatron-core cuts from each
    SwiGLU `linear_fc1`) one compact copy per distinct view, in place.

    megatron-core's writer clones every CPU view it writes; upcycled experts are N views of the same
    tensor, so without this the writer would hold N clones of every FFN.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_state_dict)
    copies = {}
    for item in nested_values(sharded_state_dict):
        if not isinstance(item, ShardedTensor) or item.data is None or item.data.device.type != "cpu":
            continue
        data = item.data
        if data.untyped_storage().nbytes() == data.numel() * data.element_size():
            continue
        key = (data.untyped_storage().data_ptr(), data.storage_offset(), tuple(data.shape), data.stride(), data.dtype)
        if key not in copies:
            copies[key] = data.clone()
        item.data = copies[key]


def save_sharded(sharded_state_dict: dict, iteration_dir: str, content_metadata: Optional[dict] = None) -> None:
    """Write a torch_dist checkpoint (synchronous, one writer thread: safe on CPU); `content_metadata`
    (JSON-able) records how the state was sharded, for the loader (Megatron-LM's convention)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    os.makedirs(iteration_dir, exist_ok=True)
    share_view_copies(sharded_state_dict)
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    dist_checkpointing.save(sharded_state_dict, iteration_dir, sharded_strategy=strategy, content_metadata=content_metadata)


def model_state(model, metadata: Optional[dict] = None) -> dict:
    """The model part of a checkpoint, nested under "model" as Megatron-LM does (on-disk keys are unchanged).
    `metadata`: megatron-core's sharded-state-dict metadata (train.checkpointing builds it as Megatron-LM does)."""
    return {"model": model.sharded_state_dict(metadata=metadata)}


def load_model_weights(model, iteration_dir: str) -> None:
    """Load a torch_dist checkpoint's model weights into a megatron model (any parallel layout)."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model_state(model), iteration_dir)
    model.load_state_dict(state["model"])
