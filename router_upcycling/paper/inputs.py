"""The paths the matrix's runs read and write, from the command line: checked, made absolute, recorded."""
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from router_upcycling.errors import UserError
from router_upcycling.paper.recipes import Recipe, is_number


class MatrixError(UserError):
    """Missing or wrong inputs, or an output root that holds a run with other settings."""


@dataclass(frozen=True)
class Inputs:
    """What the runs read and where they write; None or empty where not given (a dry run shows placeholders)."""

    dense_models: Dict[str, str] = field(default_factory=dict)   # backbone name -> dense HF folder
    calib_data: List[str] = field(default_factory=list)
    data_path: List[str] = field(default_factory=list)           # indexed prefix(es), or a weighted blend
    output_root: Optional[str] = None
    eval_data_dir: Optional[str] = None
    routing_domains: List[str] = field(default_factory=list)     # NAME=FILE

    def dense(self, backbone: str) -> str:
        return self.dense_models.get(backbone, f"<dense {backbone}>")

    def as_dict(self, recipe: Recipe) -> dict:
        """The inputs a run uses, as recorded in its recipe.yaml."""
        return {"dense-model": self.dense(recipe.backbone), "calib-data": self.calib_data if recipe.needs_calibration else [],
                "data-path": self.data_path, "eval-data-dir": self.eval_data_dir, "routing-domains": self.routing_domains}


def _pairs(specs: List[str], flag: str, form: str) -> List[Tuple[str, str]]:
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not (sep and name and path):
            raise MatrixError(f"{flag} expects {form}, got {spec!r}")
        pairs.append((name, path))
    return pairs


def inputs_from_arguments(dense_models: List[str], calib_data: List[str], data_path: List[str], output_root: Optional[str],
                          eval_data_dir: Optional[str], routing_domains: List[str]) -> Inputs:
    """The command line's paths as Inputs, made absolute (the jobs run from the repository root)."""
    absolute = os.path.abspath
    dense = _pairs(dense_models, "--dense-model", "BACKBONE=FOLDER (e.g. Qwen1.5-0.5B=/models/Qwen1.5-0.5B)")
    domains = _pairs(routing_domains, "--routing-domain", "NAME=FILE")
    return Inputs(
        dense_models={backbone: absolute(folder) for backbone, folder in dense},
        calib_data=[absolute(path) for path in calib_data],
        data_path=[word if is_number(word) else absolute(word) for word in data_path],
        output_root=absolute(output_root) if output_root else None,
        eval_data_dir=absolute(eval_data_dir) if eval_data_dir else None,
        routing_domains=[f"{name}={absolute(path)}" for name, path in domains],
    )


def placeholder(values: List[str], name: str) -> List[str]:
    return values or [f"<{name}>"]


def check_inputs(inputs: Inputs, recipes: List[Recipe], required: bool) -> None:
    """Given paths must exist; with `required` (a real run) every path the runs need must be given."""
    def need(given: bool, flag: str) -> None:
        if required and not given:
            raise MatrixError(f"{flag} is required (or use --dry-run)")

    need(inputs.output_root is not None, "--output-root")
    for backbone in dict.fromkeys(recipe.backbone for recipe in recipes):
        need(backbone in inputs.dense_models, f"--dense-model {backbone}=FOLDER")
        if backbone in inputs.dense_models and not Path(inputs.dense_models[backbone], "config.json").is_file():
            raise MatrixError(f"--dense-model {backbone}: no Hugging Face model (config.json) in {inputs.dense_models[backbone]}")
    need(bool(inputs.calib_data) or not any(recipe.needs_calibration for recipe in recipes), "--calib-data")
    for path in inputs.calib_data:
        if not Path(path).exists():
            raise MatrixError(f"--calib-data {path}: not found")
    need(bool(inputs.data_path), "--data-path")
    for prefix in inputs.data_path:
        if not is_number(prefix) and not (Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()):
            raise MatrixError(f"--data-path {prefix}: {prefix}.bin and .idx not found (write them with tools/preprocess_data.py)")
    need(inputs.eval_data_dir is not None, "--eval-data-dir")
    if inputs.eval_data_dir is not None and not Path(inputs.eval_data_dir).is_dir():
        raise MatrixError(f"--eval-data-dir {inputs.eval_data_dir}: not a folder (write it with tools/mirror_eval_data.py)")
    need(bool(inputs.routing_domains), "--routing-domain NAME=FILE")
    for spec in inputs.routing_domains:
        path = spec.partition("=")[2]
        if not Path(path).exists():
            raise MatrixError(f"--routing-domain {spec}: {path} not found")
