"""The paper's runs as recipes (configs/paper/NAME.yaml), resolved into each stage's flags.

A recipe file holds these keys, each optional:

    base: FILE                  a recipe it extends (path relative to this file); mappings merge key by key,
                                anything else is replaced
    backbone: NAME              the dense model's name (e.g. Qwen1.5-0.5B); the matrix maps it to a folder
    upcycle: {flag: value}      flags of `tools/convert_checkpoint.py upcycle`; null: the run trains from scratch
    train-config: FILE          a flat YAML of training flags (`python -m router_upcycling.train --config`)
    train: {flag: value}        training flags over train-config's
    export: / eval: / routing:  flags of `convert_checkpoint.py export`, `python -m router_upcycling.eval` and
                                `python -m router_upcycling.analyze routing`
    slurm: {stage: [option]}    sbatch options of each stage
    train-processes-per-node: N training processes per node (default: one per GPU)

Flag names are the commands' own, without dashes in front (`num-experts` or `num_experts`). Paths to data,
models and outputs are not part of a recipe: the matrix adds them. A profile (configs/paper/profiles/NAME.yaml)
has the same keys and is merged over a recipe, then `SECTION.FLAG=VALUE` overrides.
"""
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from router_upcycling.errors import UserError
from router_upcycling.eval.report import PAPER_TABLES
from router_upcycling.resources import resource_root
from router_upcycling.settings.routers import DEFAULT_ROUTER, get_router

CONFIG_DIR = resource_root() / "configs" / "paper"
PROFILE_DIR = CONFIG_DIR / "profiles"
STAGES = ("upcycle", "train", "export", "eval", "routing")  # each has a section of flags and one of sbatch options
KEYS = {"base", "backbone", "train-config", "slurm", "train-processes-per-node", *STAGES}

# every run of the paper's tables, in table order
RUN_NAMES: List[str] = list(dict.fromkeys(run for _, columns in PAPER_TABLES.values() for run, _ in columns))


class RecipeError(UserError):
    """A recipe, profile or override that cannot be read or does not fit."""


@dataclass(frozen=True)
class Recipe:
    """One run's settings; flag mappings use dashed names."""

    name: str
    backbone: str
    upcycle: Optional[Dict[str, Any]]
    train: Dict[str, Any]
    export: Dict[str, Any]
    eval: Dict[str, Any]
    routing: Dict[str, Any]
    slurm: Dict[str, List[str]]
    train_processes_per_node: Optional[int]

    @property
    def stages(self) -> List[str]:
        return [stage for stage in STAGES if stage != "upcycle" or self.upcycle is not None]

    @property
    def train_iters(self) -> int:
        return int(self.train["train-iters"])

    @property
    def needs_calibration(self) -> bool:
        """Mixture-of-Routers' average keys come from calibration text; the other routers need none."""
        return self.upcycle is not None and get_router(self.upcycle.get("router", DEFAULT_ROUTER)).needs_calibration

    def as_dict(self) -> dict:
        return {"name": self.name, "backbone": self.backbone, "upcycle": self.upcycle, "train": self.train,
                "export": self.export, "eval": self.eval, "routing": self.routing, "slurm": self.slurm,
                "train-processes-per-node": self.train_processes_per_node}


def dashed(flags: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """{flag: value} with every name spelt with dashes, as on the command line."""
    return None if flags is None else {str(key).lstrip("-").replace("_", "-"): value for key, value in flags.items()}


def merge(base: dict, over: dict) -> dict:
    """`over` merged into `base`: nested mappings key by key, every other value replaced."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must be a mapping")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise RecipeError(f"{path}: unknown key {unknown[0]!r}; expected some of {', '.join(sorted(KEYS))}")
    for section in STAGES:
        if section in data and data[section] is not None and not isinstance(data[section], dict):
            raise RecipeError(f"{path}: {section} must be a mapping of flags to values")
        if isinstance(data.get(section), dict):
            data[section] = dashed(data[section])
    if "train-config" in data:  # relative to the file that names it
        data["train-config"] = str((path.parent / data["train-config"]).resolve())
    return data


def read_recipe_file(path: Path, seen: Sequence[Path] = ()) -> dict:
    """A recipe file with its `base` chain merged in."""
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"{path}: its base chain comes back to itself")
    data = _read_yaml(path)
    base = data.pop("base", None)
    return merge(read_recipe_file(path.parent / base, [*seen, path]), data) if base else data


def read_train_config(path: str) -> Dict[str, Any]:
    """The flags of a flat training YAML (the file `python -m router_upcycling.train --config` reads)."""
    data = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
    if not isinstance(data, dict):
        raise RecipeError(f"train-config {path} is missing or not a mapping of training flags")
    return dashed(data)


def profile_path(profile: str) -> Path:
    """A profile's file: a name under configs/paper/profiles/ or a path."""
    path = PROFILE_DIR / f"{profile}.yaml" if "/" not in profile and not profile.endswith(".yaml") else Path(profile)
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise RecipeError(f"profile {profile!r} not found (a file, or one of: {names})")
    return path


def parse_override(text: str) -> dict:
    """`SECTION.FLAG=VALUE` (VALUE read as YAML: 4, 1e-4, true, [0.8, 0.9]) as a nested mapping."""
    key, sep, value = text.partition("=")
    section, dot, flag = key.partition(".")
    if not sep or not dot or not flag or section not in STAGES:
        raise RecipeError(f"--set expects SECTION.FLAG=VALUE with SECTION one of {', '.join(STAGES)}; got {text!r}")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str) and is_number(parsed):  # YAML 1.1 reads 1e-4 (no dot) as text
        parsed = float(parsed)
    return {section: dashed({flag: parsed})}


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_run_names(names: Sequence[str]) -> List[str]:
    """`all` or run names, in table order; an unknown name is an error naming the runs."""
    if list(names) == ["all"]:
        return list(RUN_NAMES)
    unknown = [name for name in names if name not in RUN_NAMES]
    if unknown:
        raise RecipeError(f"unknown run {unknown[0]!r}; runs: all, {', '.join(RUN_NAMES)}")
    return [name for name in RUN_NAMES if name in names]


def load_recipe(name: str, profile: Optional[str] = None, overrides: Sequence[str] = ()) -> Recipe:
    """configs/paper/NAME.yaml with its base chain, then the profile, then the overrides."""
    check_run_names([name])
    data = read_recipe_file(CONFIG_DIR / f"{name}.yaml")
    from_scratch = data.get("upcycle", {}) is None
    if profile:
        data = merge(data, read_recipe_file(profile_path(profile)))
    for override in overrides:
        data = merge(data, parse_override(override))
    if from_scratch:  # a profile's or override's upcycle flags do not give a from-scratch run an upcycle stage
        data["upcycle"] = None
    if "backbone" not in data:
        raise RecipeError(f"recipe {name}: no backbone")
    train = merge(read_train_config(data["train-config"]) if data.get("train-config") else {}, data.get("train") or {})
    if "train-iters" not in train:
        raise RecipeError(f"recipe {name}: no train-iters")
    check_train_numbers(name, train)
    check_train_flags(name, train)
    slurm = data.get("slurm") or {}
    unknown = sorted(set(slurm) - set(STAGES))
    if unknown:
        raise RecipeError(f"recipe {name}: slurm has an unknown stage {unknown[0]!r}")
    return Recipe(
        name=name, backbone=str(data["backbone"]), upcycle=data.get("upcycle", {}), train=train,
        export=data.get("export") or {}, eval=data.get("eval") or {}, routing=data.get("routing") or {},
        slurm={stage: [str(option) for option in slurm.get(stage) or []] for stage in STAGES},
        train_processes_per_node=data.get("train-processes-per-node"),
    )


def check_train_numbers(name: str, train: Dict[str, Any]) -> None:
    """The training numbers every run needs right, whether its recipe, the profile or --set gave them."""
    iters, lr = train["train-iters"], train.get("lr")
    lr = float(lr) if isinstance(lr, str) and is_number(lr) else lr  # YAML 1.1 reads 1e-4 (no dot) as text
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise RecipeError(f"recipe {name}: train-iters must be an integer of at least 1, got {iters!r} "
                          "(--train-iters or --set train.train-iters)")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise RecipeError(f"recipe {name}: train lr must be a positive number, got {lr!r} (--set train.lr)")


def check_train_flags(name: str, train: Dict[str, Any]) -> None:
    """Every train key must be a flag of `python -m router_upcycling.train` (a typo would otherwise fail only in the
    Slurm job, hours later)."""
    from router_upcycling.train.config import TrainingConfig

    flags = {field.metadata["flag"].lstrip("-") for field in fields(TrainingConfig)}
    unknown = sorted(str(key) for key in train if str(key) not in flags)
    if unknown:
        raise RecipeError(f"recipe {name}: train has no flag --{unknown[0]} (python -m router_upcycling.train --help "
                          "lists them)")


def flag_argv(flags: Dict[str, Any]) -> List[str]:
    """{flag: value} as command-line words: true -> --flag, false -> --no-flag, a list -> --flag v1 v2, null -> left out."""
    argv: List[str] = []
    for flag, value in flags.items():
        if value is None:
            continue
        if value is True or value is False:
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{flag}", *map(str, value)]
        else:
            argv += [f"--{flag}", str(value)]
    return argv
