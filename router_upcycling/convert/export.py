"""Export a Megatron MoE checkpoint (upcycled or trained) to a Hugging Face folder.

The checkpoint is read through megatron-core's distributed checkpoint loading into a model at
TP = PP = EP = 1, whatever layout it was saved with; the family's weight table then maps it to the `mor`
naming, which the HF writers turn into a `mor` (remote code) or stock folder (the family's own MoE).
"""
import os

from router_upcycling.convert.hf_export import write_mor_folder, write_stock_folder
from router_upcycling.convert.mapping import map_mcore_to_mor
from router_upcycling.convert.verify import load_megatron_model
from router_upcycling.checkpoint_folder import TOKENIZER_DIR, read_tracker
from router_upcycling.mcore.checkpoint import STORAGE_DTYPES
from router_upcycling.settings.export import MOR_FORMAT, check_export


def tokenizer_of(checkpoint: str, metadata: dict) -> str:
    """The checkpoint's tokenizer/; for a Megatron-LM run without one, the source checkpoint's its metadata names."""
    own = os.path.join(checkpoint, TOKENIZER_DIR)
    return own if os.path.isdir(own) or not metadata.get("tokenizer_dir") else metadata["tokenizer_dir"]


def export(checkpoint: str, output: str, fmt: str, iteration=None, dtype: str = "bf16", force: bool = False) -> str:
    """Write `output` in format `fmt` from the checkpoint folder; returns the output path."""
    metadata, arch, moe = check_export(checkpoint, output, fmt, force)
    model, _ = load_megatron_model(checkpoint, iteration)
    mcore_tensors = {name: param.detach() for name, param in model.named_parameters()}
    tensors = map_mcore_to_mor(mcore_tensors, arch, moe.num_experts)
    del model, mcore_tensors
    exported_iteration = iteration if iteration is not None else read_tracker(checkpoint)
    card = {**metadata, "training": {**(metadata.get("training") or {}), "iteration": exported_iteration}}
    writer = write_mor_folder if fmt == MOR_FORMAT else write_stock_folder
    return writer(
        tensors, metadata["hf_config"], moe, tokenizer_dir=tokenizer_of(checkpoint, metadata), output_dir=output,
        dtype=STORAGE_DTYPES[dtype], card=card, force=force,
    )
