"""Loading options and checks for Hugging Face model folders (dense, stock MoE or our `mor` export)."""
from typing import Optional

from router_upcycling.errors import UserError


def check_tokenizer_fits(tokenizer, vocab_size, model_dir: str) -> None:
    """The tokenizer must not make ids the model has no embedding for (an IndexError deep inside torch)."""
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise UserError(f"{model_dir}: its tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} "
                        "embeddings; the tokenizer belongs to another model")


def check_vocabulary(model_dir: str, trust_remote_code: bool = True):
    """The folder's tokenizer, once it is known to fit the folder's model (check_tokenizer_fits)."""
    import os

    from transformers import AutoTokenizer

    from router_upcycling.files import read_json_object

    config = read_json_object(os.path.join(model_dir, "config.json"), UserError)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    check_tokenizer_fits(tokenizer, config.get("vocab_size"), model_dir)
    return tokenizer


def usable_device(requested: Optional[str]) -> str:
    """The torch device to run on: `requested` once it is known to exist here (UserError naming --device otherwise),
    or cuda when available, else cpu."""
    import torch

    if not requested:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise UserError(f"--device {requested}: this machine has {count} CUDA device{'s' if count != 1 else ''}"
                            f"{'' if torch.backends.cuda.is_built() else ' (this torch is built without CUDA)'}")
    elif device.type != "cpu" and not getattr(torch, device.type, None):
        raise UserError(f"--device {requested}: no {device.type} backend in this torch")
    return requested


def experts_kwargs(device: Optional[str]) -> dict:
    """`from_pretrained` keyword arguments for the expert kernel on `device`.

    transformers 5 runs MoE experts with `grouped_mm` by default, which on CPU is about 5x slower
    than visiting each expert with its tokens (`eager`; measured on a tiny Qwen2-MoE, 2 cores).
    Dense models accept and ignore the option.
    """
    if device is None or str(device).startswith("cpu"):
        return {"experts_implementation": "eager"}
    return {}
