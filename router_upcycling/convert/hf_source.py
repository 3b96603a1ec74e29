"""Reading the tensors of dense Hugging Face checkpoints (single or sharded safetensors); their config.json is read
and checked by router_upcycling.settings."""
import json
import os
from typing import Dict, Iterable

import torch

from router_upcycling.errors import UserError


class ConversionError(UserError):
    """A user mistake or bad input to the converter; reported as one line, no traceback."""


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
