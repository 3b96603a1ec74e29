"""`python -m router_upcycling.megatron_lm`: Router Upcycling on Megatron-LM's own loop, on CPU with gloo, as users
launch it (torchrun): the upcycled model is the dense one, data and expert parallelism learn like one rank, resume is
exact, our tools read its checkpoints and each trainer resumes the other's, and a wrong architecture flag is refused."""
import json
import os
import shutil

import pytest
import torch

from megatron_lm_runs import grad_norms, losses, megatron_lm_flags, needs_training_layer, run_megatron_lm
from training_runs import copy_rewound, run, train_flags, train_losses

pytestmark = needs_training_layer


def test_the_upcycled_model_starts_as_the_dense_one_and_exports(mlm_inputs, tmp_path):
    from router_upcycling.convert.export import export
    from router_upcycling.convert.verify import verify
    from router_upcycling.mcore.checkpoint import common_state, readable_iteration_dir

    save = tmp_path / "run"
    output = run_megatron_lm(megatron_lm_flags(mlm_inputs, save, "--lr", "0.0", "--min-lr", "0.0",
                                               "--lr-warmup-iters", "0", "--save-interval", "1", iters=1))
    assert "--dist-ckpt-strictness raise_all" not in output  # the flags are ours to add, not printed as given
    assert "routing health at iteration" not in output or "dead experts" in output
    metadata = json.loads((save / "router_upcycling.json").read_text())
    assert metadata["moe"]["router"] == "mor" and metadata["trainer"] == "megatron_lm"
    assert (save / "tokenizer" / "tokenizer.json").is_file()
    report = verify(mlm_inputs["dense"], str(save), long_seq_length=0)  # a step at learning rate 0: still the dense model
    assert report.max_abs_diff < 1e-4 and report.top1_agreement == 1.0, report
    common = common_state(readable_iteration_dir(str(save)))
    assert common["args"].num_experts == 4 and common["args"].spec == ["router_upcycling.megatron_lm.spec", "layer_spec"]
    assert os.path.isdir(export(str(save), str(tmp_path / "hf"), "mor", dtype="fp32"))
    # a --save folder of a user's own pretrain_gpt.py with our --spec has neither file: its args say what it holds
    bare = tmp_path / "bare"
    shutil.copytree(save, bare)
    os.remove(bare / "router_upcycling.json")
    shutil.rmtree(bare / "tokenizer")
    assert os.path.isdir(export(str(bare), str(tmp_path / "hf-bare"), "mor", dtype="fp32"))
    assert (tmp_path / "hf-bare" / "model.safetensors").read_bytes() == (tmp_path / "hf" / "model.safetensors").read_bytes()


def test_routing_health_is_logged(mlm_straight):
    _, output = mlm_straight
    assert "routing health at iteration 1: max share 0." in output and "dead experts" in output
    assert sorted(losses(output)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("layout", [["--expert-model-parallel-size", "2"],
                                    ["--use-distributed-optimizer"]], ids=["ep2", "dp2-distributed-optimizer"])
def test_two_ranks_learn_like_one(layout, mlm_inputs, mlm_straight, tmp_path):
    _, output = mlm_straight
    one_rank = losses(output)
    two_ranks = losses(run_megatron_lm(megatron_lm_flags(mlm_inputs, tmp_path / "run", *layout, iters=4), nproc=2))
    assert [two_ranks[it] for it in range(1, 5)] == pytest.approx([one_rank[it] for it in range(1, 5)], rel=1e-5)


def model_tensors(checkpoint) -> dict:
    from router_upcycling.convert.verify import load_megatron_model

    model, _ = load_megatron_model(str(checkpoint))
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if tensor is not None and "extra_state" not in name}


def test_resume_is_exact(mlm_inputs, mlm_straight, tmp_path):
    """Resumed at 3, the run computes what the straight one did: every gradient norm, the final weights bit for bit.
    The logged loss of iteration 5 (the second after the restart) is Megatron-LM's mean of iterations 4 and 5 (it
    does not reset its accumulators after a start's first iteration): the drift the issue saw, in the log only."""
    save, output = mlm_straight
    resumed = copy_rewound(save, tmp_path / "run", 3)
    again = run_megatron_lm(megatron_lm_flags(mlm_inputs, resumed))
    assert "successfully loaded checkpoint" in again
    straight, continued = losses(output), losses(again)
    assert sorted(continued) == [4, 5, 6]
    assert [grad_norms(again)[it] for it in (4, 5, 6)] == [grad_norms(output)[it] for it in (4, 5, 6)]
    assert (continued[4], continued[6]) == (straight[4], straight[6])
    assert continued[5] == pytest.approx((straight[4] + straight[5]) / 2, abs=2e-6)
    expected, got = model_tensors(save), model_tensors(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def our_flags(inputs, save, *extra) -> list:
    """Our trainer with the schedule of megatron_lm_flags (same learning rates, warmup and decay over 6 steps)."""
    flags = train_flags(inputs, save, "--load", str(save), "--eval-iters", "0", "--lr-decay-style", "cosine",
                        "--min-lr", "3e-4", "--moe-aux-loss-coeff", "0.01", "--seed", "1", *extra)
    flags[flags.index("--train-iters") + 1] = "6"
    return flags


def test_our_trainer_resumes_a_megatron_lm_checkpoint(mlm_inputs, mlm_straight, tmp_path):
    save, output = mlm_straight
    resumed = copy_rewound(save, tmp_path / "run", 3)
    ours = run(our_flags(mlm_inputs, resumed))
    assert "resuming at step 3" in ours
    continued, straight = train_losses(resumed), losses(output)
    assert sorted(continued) == [4, 5, 6]
    # the same data order, loss and optimizer: ours continues Megatron-LM's run as Megatron-LM does (its 6 decimals)
    assert [continued[it] for it in (4, 5, 6)] == pytest.approx([straight[it] for it in (4, 5, 6)], abs=2e-6)


def test_megatron_lm_resumes_a_checkpoint_of_our_trainer(mlm_inputs, mlm_straight, tmp_path):
    save = tmp_path / "ours"
    run(our_flags(mlm_inputs, save, "--exit-interval", "3"))
    ours, straight = train_losses(save), losses(mlm_straight[1])
    assert (ours[1], ours[3]) == pytest.approx((straight[1], straight[3]), abs=2e-6)  # 2: Megatron-LM logs a mean
    output = run_megatron_lm(megatron_lm_flags(mlm_inputs, save))
    assert "successfully loaded checkpoint" in output and "could not find arguments" not in output
    assert "consumed samples:           32" in output  # the data position carried over: 3 x 8, then one more batch
    resumed = losses(output)
    assert sorted(resumed) == [4, 5, 6]
    assert (resumed[4], resumed[6]) == pytest.approx((straight[4], straight[6]), abs=2e-6)


def test_a_wrong_architecture_flag_is_refused_naming_it(mlm_inputs, tmp_path):
    save = tmp_path / "run"
    output = run_megatron_lm(megatron_lm_flags(mlm_inputs, save, "--num-query-groups", "4"), expect_ok=False,
                             torchrun=False)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--num-query-groups 8" in errors[0] and "not 4" in errors[0], output[-2000:]
    assert "Traceback" not in output
    assert not (save / "router_upcycling.json").exists()
