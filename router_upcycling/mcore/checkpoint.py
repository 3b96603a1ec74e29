"""torch_dist I/O of Megatron checkpoint folders (docs/checkpoint-format.md); the folder's files (metadata,
tracker, tokenizer) are router_upcycling.checkpoint_folder's."""
import os
from typing import Optional

import torch

# the metadata's "dtype" (and the converter's --dtype) names the stored weights' precision
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


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
