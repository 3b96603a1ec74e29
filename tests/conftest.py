import os
import sys

# Shared test helpers (distributed launcher, Slurm cluster, HF export support) live beside this file; training-run helpers in train/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest


@pytest.fixture(autouse=True)
def fresh_moe_aux_loss_scale():
    """megatron-core keeps the MoE aux-loss scale in one class-level tensor: a backward outside a schedule creates it
    0-d, a schedule later copies a size-1 scale into it (and fails, megatron-core 0.19). Each test starts without it,
    as a fresh process does."""
    yield
    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None:
        moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale = None
