"""Files the package ships beside its code: the recipes (configs/) and the Slurm scripts (scripts/slurm/).

They live at the top of the source tree. An installed package (`pip install .`) carries a copy under
router_upcycling/_resources/, made by setup.py's build step; a source checkout or an editable install reads them
in place. $ROUTER_UPCYCLING_RESOURCES names another folder with the same layout (your own edited copy).
"""
import os
from pathlib import Path
from typing import Optional

from router_upcycling.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGED = PACKAGE_DIR / "_resources"
SOURCE_ROOT = PACKAGE_DIR.parent
SHIPPED = ("configs", "scripts/slurm")  # relative folders copied into PACKAGED
ENVIRONMENT = "ROUTER_UPCYCLING_RESOURCES"


def resource_root() -> Path:
    """The folder that holds configs/ and scripts/slurm/: $ROUTER_UPCYCLING_RESOURCES, the installed copy, or the
    source checkout this package runs from."""
    if os.environ.get(ENVIRONMENT):
        return Path(os.environ[ENVIRONMENT]).resolve()
    if PACKAGED.is_dir():
        return PACKAGED
    return SOURCE_ROOT


def resource_path(relative: str) -> Path:
    """The shipped file or folder `relative` (e.g. "configs/paper/mor.yaml"); UserError when it is missing."""
    path = resource_root() / relative
    if not path.exists():
        raise UserError(f"{relative} is not in {resource_root()} (the package's recipes and scripts; set "
                        f"${ENVIRONMENT} to a folder holding configs/ and scripts/slurm/)")
    return path


def source_checkout() -> Optional[Path]:
    """The git checkout this package runs from, or None for an installed copy."""
    return SOURCE_ROOT if (SOURCE_ROOT / ".git").exists() else None
