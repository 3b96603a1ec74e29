"""torch_dist I/O of Megatron checkpoint folders (docs/checkpoint-format.md); the folder's files (metadata,
tracker, tokenizer) are router_upcycling.checkpoint_folder's."""
import os
from typing import Optional

import torch

CHECKPOINT_VERSION = 3.0  # Megatron-LM's common-state `checkpoint_version` (below 3.0 it reorders the QKV weights)
# the metadata's "dtype" (and the converter's --dtype) names the stored weights' precision
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def iteration_problem(iteration_dir: str) -> Optional[str]:
    """Why a saved iteration folder cannot be loaded (naming the file), or None when it reads.

    Checks what loading reads before any tensor: megatron-core's metadata.json, torch's `.metadata` (the index of
    every tensor's file, offset and length), every shard file being at least as long as the index says, and the
    common state. A truncated shard, a damaged index or common state is found without reading the model's tensors.
    """
    from router_upcycling.files import read_json_object

    def name(file: str) -> str:
        return os.path.join(iteration_dir, file)

    if not os.path.isdir(iteration_dir):
        return f"{iteration_dir} does not exist"
    try:
        read_json_object(name("metadata.json"), ValueError)
    except (OSError, ValueError) as err:
        return f"{name('metadata.json')} is missing or damaged ({err})"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        index = FileSystemReader(iteration_dir).read_metadata()
    except Exception as err:  # torch raises pickle, EOF and its own errors for a damaged index
        return f"{name('.metadata')} is missing or damaged ({reason(err)})"
    needed = {}
    for storage in index.storage_data.values():
        needed[storage.relative_path] = max(needed.get(storage.relative_path, 0), storage.offset + storage.length)
    for file, length in sorted(needed.items()):
        size = os.path.getsize(name(file)) if os.path.isfile(name(file)) else None
        if size is None or size < length:
            what = "is missing" if size is None else f"is truncated ({size} of {length} bytes)"
            return f"{name(file)} {what}"
    try:
        common_state(iteration_dir)
    except Exception as err:  # torch and pickle raise many kinds for a damaged file
        where = name("common.pt") if os.path.exists(name("common.pt")) else f"the common state in {iteration_dir}"
        return f"{where} is missing or damaged ({reason(err)})"
    return None


def reason(error: BaseException) -> str:
    """An exception's kind and first line: torch's messages for a damaged file run to several lines (and a failed
    weights-only load advises loading it unsafely, which is no advice for a damaged file)."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    if "weights only load failed" in first.lower():
        first = "its pickled data does not read"
    return f"{type(error).__name__}: {first[:160]}" if first else type(error).__name__


def common_state(iteration_dir: str) -> dict:
    """The non-sharded values of a saved iteration (iteration, args, scheduler...): in common.pt up to
    megatron-core 0.18, inside the torch_dist files from 0.19; megatron-core reads either."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(iteration_dir)


def readable_iteration_dir(checkpoint_dir: str, iteration=None) -> str:
    """The folder of the requested iteration (default: the latest complete one), checked: CheckpointError naming the
    damaged file, and the older iterations that do read, otherwise."""
    from router_upcycling.checkpoint_folder import (
        CheckpointError, other_iterations_hint, resolve_iteration_dir, saved_iterations,
    )

    path = resolve_iteration_dir(checkpoint_dir, iteration)
    problem = iteration_problem(path)
    if problem:
        older = [it for it in saved_iterations(checkpoint_dir) if it != os.path.basename(path)
                 and iteration_problem(os.path.join(checkpoint_dir, it)) is None]
        hint = other_iterations_hint("readable", older) or "; no other iteration there reads"
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}{hint}")
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
