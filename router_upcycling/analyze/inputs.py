"""Inputs of the analyses: the Hugging Face model, and the error class of the analyses.

Texts become token chunks through router_upcycling.text (EOS-joined documents cut into chunks, no padding).
"""
from pathlib import Path

import torch

from router_upcycling.analyze.errors import AnalysisError
from router_upcycling.hf.loading import check_vocabulary, experts_kwargs


def load_model(model_dir: str, device: str, dtype: str, trust_remote_code: bool = True):
    """(model, tokenizer) from a Hugging Face folder, in eval mode on device."""
    from transformers import AutoModelForCausalLM

    if not Path(model_dir, "config.json").is_file():
        raise AnalysisError(f"not a Hugging Face model folder (no config.json): {model_dir}")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise AnalysisError(f"unknown --dtype {dtype!r}; use float32, bfloat16 or float16")
    tokenizer = check_vocabulary(model_dir, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                 **experts_kwargs(device))
    return model.to(device).eval(), tokenizer
