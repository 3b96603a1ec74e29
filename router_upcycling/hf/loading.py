"""Loading options and checks for Hugging Face model folders (dense, stock MoE or our `mor` export)."""
from typing import Optional

from router_upcycling.errors import UserError


def check_vocabulary(model_dir: str, trust_remote_code: bool = True) -> None:
    """The folder's tokenizer must not make ids its model has no embedding for (an IndexError deep inside torch)."""
    import json
    import os

    from transformers import AutoTokenizer

    with open(os.path.join(model_dir, "config.json")) as f:
        vocab_size = (json.load(f) or {}).get("vocab_size")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise UserError(f"{model_dir}: its tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} "
                        "embeddings; the tokenizer belongs to another model")


def experts_kwargs(device: Optional[str]) -> dict:
    """`from_pretrained` keyword arguments for the expert kernel on `device`.

    transformers 5 runs MoE experts with `grouped_mm` by default, which on CPU is about 5x slower
    than visiting each expert with its tokens (`eager`; measured on a tiny Qwen2-MoE, 2 cores).
    Dense models accept and ignore the option.
    """
    if device is None or str(device).startswith("cpu"):
        return {"experts_implementation": "eager"}
    return {}
