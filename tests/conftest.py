import os
import sys

import pytest

# Shared test helpers (distributed launcher, Slurm cluster) live beside this file; training-run helpers in train/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group marks into the node ids
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs two workers), every test that uses the one-node Slurm cluster runs on
    the same worker (`--dist loadgroup`): the cluster is one per machine, started and stopped per test module."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("slurm"))
