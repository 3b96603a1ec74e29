"""The settings of `upcycle` and the checks that need no model: run before torch, transformers and megatron-core
are imported, so a refused conversion costs a fraction of a second."""
import dataclasses
import os
from typing import List, Optional, Tuple

from router_upcycling.errors import SettingError
from router_upcycling.outputs import refuse_existing
from router_upcycling.settings.architecture import Architecture, read_dense_model
from router_upcycling.settings.moe import MoESettings

PAPER_CALIBRATION_TOKENS = 41943040  # 10 iterations x batch 1024 x sequence 4096
# QK-norm models (Qwen3): where the routers' queries and the average keys are taken (docs/method.md part 2)
# (inside: the routers apply the query norm themselves, MoESettings.query_norm; keys as after)
QK_NORM_SIDES = ("before", "after", "inside")
# how a Mixture-of-Routers' expert keys start (docs/method.md part 2): the paper's average keys; the average queries
# of each router's heads (which grouped-query attention does not share between heads); the average keys with exact
# ties broken by a small deterministic perturbation
ROUTER_INITS = ("paper", "query", "perturb")
AUTO = "auto"
# what `auto` picks, by experiment (docs/results.md, "Grouped-query attention and QK-norm"): the paper's construction
# on multi-head attention without QK-norm, where it stays exactly as the paper has it; on grouped-query attention and
# QK-norm models the average queries (best on Qwen3's architecture at the paper's scoring, and with either of the MHA
# study's findings, router scale 1/sqrt(d_r) or max aggregation, on both backbones; `perturb` is ahead only at the
# unscaled sum on the GQA backbone), taken before the per-head norm (after it and inside the routers measured the
# same within noise; before folds to a stock gate and is the method as on any model). 3 seeds each.
GQA_ROUTER_INIT = "query"
QK_NORM_SIDE = "before"


def router_init_for(requested: str, arch: Architecture) -> str:
    """The router init `upcycle` uses: `requested`, or for `auto` the one chosen for this kind of attention."""
    if requested != AUTO:
        return requested
    return "paper" if arch.num_kv_heads == arch.num_heads and not arch.qk_norm else GQA_ROUTER_INIT


def qk_norm_side_for(requested: str, arch: Architecture) -> str:
    if requested != AUTO:
        return requested
    return QK_NORM_SIDE if arch.qk_norm else QK_NORM_SIDES[0]


@dataclasses.dataclass
class CalibrationSettings:
    """The calibration text for average keys (method.md part 2); SettingError names the field of a bad value."""

    files: List[str] = dataclasses.field(default_factory=list)
    json_key: str = "text"
    tokens: int = PAPER_CALIBRATION_TOKENS
    seq_length: int = 4096
    batch_size: Optional[int] = None
    qk_norm: str = AUTO  # QK-norm models: queries W_q and keys before the per-head norm, or after it
    router_init: str = AUTO  # ROUTER_INITS, or auto (router_init_for)

    def __post_init__(self):
        for field, value in (("tokens", self.tokens), ("seq_length", self.seq_length), ("batch_size", self.batch_size)):
            if value is not None and value < 1:
                raise SettingError(f"calib_{field}", f"must be at least 1, got {value}")
        if self.qk_norm not in (AUTO, *QK_NORM_SIDES):
            raise SettingError("router_qk_norm", f"must be one of {', '.join((AUTO, *QK_NORM_SIDES))}, got {self.qk_norm!r}")
        if self.router_init not in (AUTO, *ROUTER_INITS):
            raise SettingError("router_init", f"must be one of {', '.join((AUTO, *ROUTER_INITS))}, got {self.router_init!r}")


def check_upcycle(hf_model: str, output: str, moe: MoESettings, calib: CalibrationSettings,
                  force: bool) -> Tuple[dict, Architecture]:
    """(config.json, Architecture) of the dense model, once everything an upcycle needs is known to be right:
    a supported architecture, router settings its rules cover, calibration text where the router reads it,
    and an output that may be written."""
    hf_config, arch = read_dense_model(hf_model)
    moe.check(arch, upcycling=True)
    spec = moe.spec
    if spec.needs_calibration:
        if not calib.files:
            raise SettingError("calib_files", f"is required by --router {spec.name}: its initialisation reads "
                                              "calibration text (jsonl, txt, parquet or a dataset folder)")
        missing = [path for path in calib.files if not os.path.exists(path)]
        if missing:
            raise SettingError("calib_files", f"{missing[0]}: no such file or folder")
    if calib.qk_norm not in (AUTO, QK_NORM_SIDES[0]) and not (spec.needs_calibration and arch.qk_norm):
        raise SettingError("router_qk_norm", f"{calib.qk_norm} applies to routers initialised from the attention of "
                                             "QK-norm models (Qwen3)")
    if (calib.qk_norm == "inside") != moe.query_norm:
        raise SettingError("router_qk_norm", "inside and MoESettings.query_norm go together: the routers that apply "
                                             "the query norm are initialised from the norm's side")
    if calib.router_init != AUTO and not spec.needs_calibration:
        raise SettingError("router_init", f"applies to routers initialised from the attention (mor), not {spec.name}")
    refuse_existing(output, force)
    parent = os.path.dirname(os.path.abspath(output))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise SettingError("output", f"{output}: its parent {parent} is a file")
    return hf_config, arch
