import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron_lm_runs import megatron_lm_flags, run_megatron_lm  # noqa: E402


@pytest.fixture(scope="session")
def mlm_inputs(tmp_path_factory):
    from training_runs import make_inputs

    return make_inputs(tmp_path_factory.mktemp("megatron_lm_inputs"))


@pytest.fixture(scope="session")
def mlm_straight(mlm_inputs, tmp_path_factory):
    """Megatron-LM's trainer from the upcycled checkpoint: 1 rank, 6 iterations, checkpoints at 3 and 6."""
    save = tmp_path_factory.mktemp("megatron_lm_straight") / "run"
    output = run_megatron_lm(megatron_lm_flags(mlm_inputs, save, "--save-interval", "3"))
    return save, output
