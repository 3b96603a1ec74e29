"""The formats `export` writes and the checks that need no model: run before torch and transformers are imported."""
from typing import List, Optional, Tuple

from router_upcycling.checkpoint_folder import CheckpointError, read_checkpoint_settings
from router_upcycling.errors import UserError
from router_upcycling.outputs import refuse_existing
from router_upcycling.settings.architecture import Architecture
from router_upcycling.settings.families import FAMILIES, Family, family_named
from router_upcycling.settings.moe import MoESettings

MOR_FORMAT = "mor"  # our modeling code beside the weights (trust_remote_code), every router, every family
STOCK_FORMAT = "stock"  # the model family's own stock MoE (plain transformers), routers with a linear-gate form


class ExportError(UserError):
    """The tensors, configuration or destination given to an export cannot be written as asked."""


def export_formats() -> List[str]:
    """`mor`, `stock`, then each family's stock MoE by name (qwen2_moe, qwen3_moe, mixtral)."""
    return [MOR_FORMAT, STOCK_FORMAT, *(family.stock.format for family in FAMILIES)]


def stock_gate_refusal(moe: MoESettings, family: Family) -> Optional[str]:
    """Why the family's stock (linear) gate cannot express this router, or None when it can."""
    reason = moe.spec.linear_gate_refusal(moe)
    if reason is None:
        return None
    if moe.spec.mixture:
        return f"a stock {family.stock.display} gate cannot express this Mixture-of-Routers: {reason}; export the 'mor' format"
    return (f"a stock {family.stock.display} gate is linear and cannot express the '{moe.router}' router ({reason}); "
            "export the 'mor' format")


def check_format(fmt: str, arch: Architecture, moe: MoESettings) -> None:
    """Refuse what the format cannot express for this model."""
    if fmt not in export_formats():
        raise ExportError(f"unknown format {fmt!r}; expected one of {', '.join(export_formats())}")
    if fmt == MOR_FORMAT:
        return
    family = family_named(arch.family)
    if fmt not in (STOCK_FORMAT, family.stock.format):
        raise ExportError(f"format {fmt!r} is another family's stock MoE; this {family.display} model exports to "
                          f"{family.stock.format!r} ({family.stock.architecture}) or {MOR_FORMAT!r}")
    refusal = stock_gate_refusal(moe, family)
    if refusal:
        raise ExportError(refusal)


def check_export(checkpoint: str, output: str, fmt: str, force: bool) -> Tuple[dict, Architecture, MoESettings]:
    """(metadata, Architecture, MoESettings) of the checkpoint, once the export is known to be possible."""
    refuse_existing(output, force)
    try:
        metadata, arch, moe = read_checkpoint_settings(checkpoint)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    check_format(fmt, arch, moe)
    return metadata, arch, moe
