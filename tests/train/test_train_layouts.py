"""One training path on every layout: megatron-core's DDP, optimizers and schedules on 2 CPU ranks (gloo).

Every layout trains the straight 1-rank float32 run's schedule with the same global batch and stops
after step 8; its losses must match the straight run's. Checkpoints then resume on another layout
(megatron-core reshards model and optimizer) and steps 9-12 must match too. bf16 with the distributed
optimizer resumes exactly. Observed on the project's machine: every layout and every resharded resume
within 1e-6 of the straight run (float32 sums in another order); bf16 within 2e-3 of float32.
"""
import json
import os
import shutil

import pytest

from router_upcycling.checkpoint_folder import read_tracker
from training_runs import STEPS, copy_rewound, max_difference, run, train_flags, train_losses

TOLERANCE = 1e-3
FIRST, REST = range(1, 9), range(9, STEPS + 1)
TENSOR_PARALLEL = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]

# layout -> flags of its 2-rank run; each also exercises an option that runs on CPU
LAYOUTS = {
    # DP=2, distributed optimizer saved dp_reshardable (Megatron-LM's default); overlapped reduction and
    # parameter gather, full recompute
    "data": ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
             "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    # EP=2 with the alltoall dispatcher and selective recompute; the plain optimizer
    "expert": ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
               "--recompute-granularity", "selective"],
    # PP=2, 1F1B over 4 micro-batches; distributed optimizer saved fully_reshardable
    "pipeline": ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable"],
    # TP=2 with sequence parallelism (our RMSNorm's weight is all-reduced over TP like megatron's norms)
    "tensor": TENSOR_PARALLEL,
}
# resharded resume: (checkpoint's layout, ranks, flags of the resumed run)
RESHARDS = {
    "DP 2->1 (dp_reshardable)": ("data", 1, ["--use-distributed-optimizer"]),
    "EP 2->1": ("expert", 1, []),
    "PP 2->1 (fully_reshardable)": ("pipeline", 1, ["--use-distributed-optimizer"]),
    "TP 1->2": ("one rank", 2, TENSOR_PARALLEL),
}


@pytest.fixture(scope="module")
def stopped(inputs, straight_run, tmp_path_factory):
    """layout -> a run of that layout stopped after step 8 (made once, on first use)."""
    runs = {"one rank": copy_rewound(straight_run, tmp_path_factory.mktemp("one_rank") / "run", 8)}

    def get(layout: str):
        if layout not in runs:
            save = tmp_path_factory.mktemp(layout) / "run"
            output = run(train_flags(inputs, save, "--load", str(save), "--exit-interval", "8", *LAYOUTS[layout]), nproc=2)
            assert "stopping at step 8" in output and read_tracker(save) == "8", output[-2000:]
            runs[layout] = save
        return runs[layout]

    return get


def routing_records(save) -> dict:
    """step -> (expert_token_share, routing_health) of a run's metrics.jsonl."""
    records = (json.loads(line) for line in open(os.path.join(save, "metrics.jsonl")))
    return {r["step"]: (r["expert_token_share"], r["routing_health"]) for r in records if "routing_health" in r}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_learns_like_one_rank(layout, stopped, straight_run):
    assert max_difference(train_losses(stopped(layout)), train_losses(straight_run), FIRST) <= TOLERANCE
    # routing counted on every rank and summed once per log (pipeline stages hold disjoint layers; data,
    # expert and sequence-parallel ranks route disjoint tokens; recomputed layers count twice) reads as one rank
    reference = routing_records(straight_run)
    for step, (shares, health) in routing_records(stopped(layout)).items():
        assert shares == [pytest.approx(layer, abs=1e-4) for layer in reference[step][0]], step
        assert health == [pytest.approx(layer, abs=1e-4) for layer in reference[step][1]], step


@pytest.mark.parametrize("reshard", RESHARDS)
def test_checkpoint_resumes_on_another_layout(reshard, stopped, straight_run, inputs, tmp_path):
    layout, nproc, flags = RESHARDS[reshard]
    save = tmp_path / "run"
    shutil.copytree(stopped(layout), save)
    output = run(train_flags(inputs, save, "--load", str(save), *flags), nproc=nproc)
    assert "resuming at step 8" in output
    assert max_difference(train_losses(save), train_losses(straight_run), REST) <= TOLERANCE


def test_dp_reshardable_optimizer_state_names_the_layout_it_needs(stopped, inputs):
    save = stopped("data")
    before = sorted(p.name for p in save.iterdir())
    output = run(train_flags(inputs, save, "--load", str(save), "--use-distributed-optimizer",
                             "--pipeline-model-parallel-size", "2"), nproc=2, expect_ok=False)
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors and "dp_reshardable" in errors[0] and "--pipeline-model-parallel-size 1" in errors[0], output[-2000:]
    assert "[rank0]: Traceback" not in output
    assert sorted(p.name for p in save.iterdir()) == before and read_tracker(save) == "8"


def test_bf16_distributed_optimizer_resumes_exactly(inputs, straight_run, tmp_path):
    flags = ["--bf16", "--use-distributed-optimizer"]
    straight = tmp_path / "straight"
    run(train_flags(inputs, straight, "--save-interval", "8", *flags), nproc=2)
    resumed = copy_rewound(straight, tmp_path / "resumed", 8)
    output = run(train_flags(inputs, resumed, "--load", str(resumed), *flags), nproc=2)
    assert "resuming at step 8" in output and "bf16" in output
    bf16, again = train_losses(straight), train_losses(resumed)
    assert [again[step] for step in range(1, STEPS + 1)] == [bf16[step] for step in range(1, STEPS + 1)]
    # bfloat16 weights and activations follow the float32 curve closely
    assert max_difference(bf16, train_losses(straight_run), range(1, STEPS + 1)) <= 5e-3
