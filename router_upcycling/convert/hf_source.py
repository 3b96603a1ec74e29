"""Reading dense Hugging Face Qwen2-architecture checkpoints: config checks and safetensors tensors."""
import json
import os
from typing import Dict, Iterable

import torch

from router_upcycling.errors import UserError

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
SUPPORTED_MODEL_TYPES = ("qwen2",)


class ConversionError(UserError):
    """A user mistake or bad input to the converter; reported as one line, no traceback."""


def read_hf_config(model_dir: str) -> dict:
    """The dense model's config.json, checked to be a supported architecture."""
    if not os.path.isdir(model_dir):
        raise ConversionError(f"model folder not found: {model_dir}")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{model_dir} has no config.json (expected a Hugging Face model folder)")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from None
    architectures = config.get("architectures") or []
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES or not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        found = ", ".join(architectures) or config.get("model_type") or "unknown"
        raise ConversionError(
            f"unsupported architecture {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(Qwen1.5, Qwen2 and Qwen2.5 dense checkpoints)"
        )
    if config.get("use_sliding_window"):
        raise ConversionError("sliding-window attention (use_sliding_window: true) is not supported")
    rope_type = (config.get("rope_parameters") or config.get("rope_scaling") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ConversionError(f"RoPE scaling {rope_type!r} is not supported; only the default rotary embedding")
    return config


def _weight_files(model_dir: str) -> Dict[str, str]:
    """tensor name -> safetensors file path, for single or sharded checkpoints."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(model_dir, file) for name, file in weight_map.items()}
    single = os.path.join(model_dir, "model.safetensors")
    if not os.path.isfile(single):
        raise ConversionError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")
    from safetensors import safe_open

    try:
        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ConversionError(f"cannot read {single}: {err}") from None


def load_dense_tensors(model_dir: str, names: Iterable[str]) -> Dict[str, torch.Tensor]:
    """Read the named tensors; a missing tensor or a truncated/corrupt file is a ConversionError."""
    from safetensors import safe_open

    files = _weight_files(model_dir)
    names = list(names)
    missing = [n for n in names if n not in files]
    if missing:
        raise ConversionError(f"{model_dir} lacks {len(missing)} expected tensors, e.g. {missing[0]}")
    by_file: Dict[str, list] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for path, file_names in by_file.items():
        if not os.path.isfile(path):
            raise ConversionError(f"weight file missing: {path}")
        try:
            with safe_open(path, "pt") as f:
                for name in file_names:
                    tensors[name] = f.get_tensor(name)
        except ConversionError:
            raise
        except Exception as err:
            raise ConversionError(f"cannot read {path} (truncated or corrupt?): {err}") from None
    return tensors
