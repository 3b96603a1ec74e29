import pytest

from training_runs import copy_rewound, make_inputs, run, train_flags


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("train_inputs"))


@pytest.fixture(scope="session")
def straight_run(inputs, tmp_path_factory):
    """The reference: 1 rank, float32, 12 steps without a stop (and a checkpoint at step 8 to resume from)."""
    save = tmp_path_factory.mktemp("straight") / "run"
    run(train_flags(inputs, save, "--save-interval", "8"))
    return save


@pytest.fixture
def resumable_at_8(straight_run, tmp_path):
    """A copy of the straight run as it stood after its checkpoint at step 8."""
    return copy_rewound(straight_run, tmp_path / "resumed", 8)
