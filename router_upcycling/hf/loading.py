"""Loading options for Hugging Face MoE folders (stock Qwen2-MoE or our `mor` export)."""
from typing import Optional


def experts_kwargs(device: Optional[str]) -> dict:
    """`from_pretrained` keyword arguments for the expert kernel on `device`.

    transformers 5 runs MoE experts with `grouped_mm` by default, which on CPU is about 5x slower
    than visiting each expert with its tokens (`eager`; measured on a tiny Qwen2-MoE, 2 cores).
    Dense models accept and ignore the option.
    """
    if device is None or str(device).startswith("cpu"):
        return {"experts_implementation": "eager"}
    return {}
