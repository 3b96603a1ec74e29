"""Export a Megatron MoE checkpoint (upcycled or trained) to a Hugging Face folder.

The checkpoint is read through megatron-core's distributed checkpoint loading into a model at
TP = PP = EP = 1, whatever layout it was saved with; the weight table then maps it to the `mor`
naming, which the HF writers turn into a `mor` (remote code) or stock `qwen2_moe` folder.
"""
import os

from router_upcycling.convert.hf_export import ExportError, stock_gate_refusal, write_mor_folder, write_qwen2_moe_folder
from router_upcycling.convert.mapping import map_mcore_to_mor
from router_upcycling.convert.verify import load_megatron_model
from router_upcycling.mcore.checkpoint import STORAGE_DTYPES, TOKENIZER_DIR, CheckpointError, read_metadata, read_tracker
from router_upcycling.outputs import refuse_existing

FORMATS = {"mor": write_mor_folder, "qwen2_moe": write_qwen2_moe_folder}


def check_exportable(moe: dict, fmt: str) -> None:
    """Refuse, before any loading, what the format cannot express."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    refusal = stock_gate_refusal(moe) if fmt == "qwen2_moe" else None
    if refusal:
        raise ExportError(refusal)


def export(checkpoint: str, output: str, fmt: str, iteration=None, dtype: str = "bf16", force: bool = False) -> str:
    """Write `output` in format `fmt` from the checkpoint folder; returns the output path."""
    refuse_existing(output, force)
    try:
        metadata = read_metadata(checkpoint)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    hf_config, moe = metadata["hf_config"], metadata["moe"]
    check_exportable(moe, fmt)
    model, _ = load_megatron_model(checkpoint, iteration)
    mcore_tensors = {name: param.detach() for name, param in model.named_parameters()}
    tensors = map_mcore_to_mor(
        mcore_tensors,
        num_layers=hf_config["num_hidden_layers"],
        num_experts=moe["num_experts"],
        num_heads=hf_config["num_attention_heads"],
        num_query_groups=hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
        tied_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
    )
    del model, mcore_tensors
    exported_iteration = iteration if iteration is not None else read_tracker(checkpoint)
    card = {**metadata, "training": {**(metadata.get("training") or {}), "iteration": exported_iteration}}
    return FORMATS[fmt](
        tensors, hf_config, moe, tokenizer_dir=os.path.join(checkpoint, TOKENIZER_DIR), output_dir=output,
        dtype=STORAGE_DTYPES[dtype], card=card, force=force,
    )
