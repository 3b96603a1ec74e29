"""`python -m router_upcycling.train` on CPU, launched as users do (python -m, torchrun): learning, the
checkpoint folder, exact resume, SIGTERM checkpoints and bad input (tests/train/training_runs.py has the
tiny model). Parallel layouts and resharding: test_train_layouts.py."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from router_upcycling.checkpoint_folder import read_tracker, resolve_iteration_dir
from router_upcycling.routing_stats import HEALTH_KEYS
from training_runs import STEPS, launch, run, train_flags, train_losses

def test_straight_run_learns_and_writes_the_folder_contract(straight_run):
    losses = train_losses(straight_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.5
    assert read_tracker(straight_run) == str(STEPS)
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(resolve_iteration_dir(straight_run))
    assert (common["iteration"], common["consumed_samples"]) == (STEPS, STEPS * 8)
    assert common["parallel_layout"] == {"tensor": 1, "pipeline": 1, "expert": 1, "data": 1}
    assert common["opt_param_scheduler"]["num_steps"] == STEPS * 8  # Megatron-LM's unit: samples
    assert (common["checkpoint_version"], common["args"].consumed_train_samples) == (3.0, STEPS * 8)
    assert (common["args"].num_layers, common["args"].num_experts, common["args"].data_parallel_size) == (2, 4, 1)
    assert dist_checkpointing.load_content_metadata(preloaded_state_dict=common) == {
        "singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    metadata = json.loads(open(os.path.join(straight_run, "router_upcycling.json")).read())
    assert metadata["moe"]["router"] == "mor"
    assert metadata["training"] == {"iteration": STEPS, "consumed_tokens": STEPS * 8 * 32}
    assert os.path.isfile(os.path.join(straight_run, "tokenizer", "tokenizer.json"))
    records = [json.loads(line) for line in open(os.path.join(straight_run, "metrics.jsonl"))]
    step = next(r for r in records if r.get("step") == 3 and "lm_loss" in r)
    for key in ("lr", "grad_norm", "tokens_per_sec", "load_balancing_loss", "z_loss", "host_memory_mb"):
        assert key in step
    assert 50 < step["host_memory_mb"] < 8000
    shares = torch.tensor(step["expert_token_share"])
    assert shares.shape == (2, 4) and torch.allclose(shares.sum(-1), torch.ones(2), atol=1e-3)
    check_routing_health(step["routing_health"], shares, num_experts=4, topk=2)
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]


def check_routing_health(health, shares, num_experts, topk):
    """One dict per layer, every number within its range, max_share and dead experts as the token shares say."""
    assert [list(layer) for layer in health] == [list(HEALTH_KEYS)] * len(shares)
    for layer, layer_shares in zip(health, shares):
        assert layer["max_share"] == pytest.approx(layer_shares.max().item(), abs=2e-5)
        assert 1 / num_experts - 1e-4 <= layer["max_share"] <= 1
        assert layer["dead_experts"] == int((layer_shares < 0.1 / num_experts).sum())
        assert 1 / topk - 1e-4 <= layer["top1_weight"] <= 1
        assert layer["logit_std"] > 0 and 0 <= layer["entropy"] <= math.log(num_experts) + 1e-4


def test_resume_equals_straight_run_exactly(inputs, straight_run, resumable_at_8):
    save = resumable_at_8
    output = run(train_flags(inputs, save, "--load", str(save)))
    assert "resuming at step 8" in output and "| max share 0." in output
    straight, resumed = train_losses(straight_run), train_losses(save)
    assert [resumed[step] for step in range(1, STEPS + 1)] == [straight[step] for step in range(1, STEPS + 1)]


def test_sigterm_saves_a_checkpoint_that_resumes(inputs, tmp_path):
    save = tmp_path / "run"
    flags = train_flags(inputs, save, "--load", str(save), "--eval-iters", "0")
    flags[flags.index("--train-iters") + 1] = "1000"
    process = launch(flags, nproc=2)
    deadline = time.time() + 120
    while not (os.path.isfile(save / "metrics.jsonl") and len(train_losses(save)) >= 2):
        assert time.time() < deadline and process.poll() is None, "training did not start"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)  # torchrun forwards it to its workers
    output, _ = process.communicate(timeout=120)
    assert "stopping at step" in output and "SIGTERM" in output, output[-3000:]
    saved = int(read_tracker(save))
    assert saved >= 2 and os.path.isdir(resolve_iteration_dir(save))

    resume = train_flags(inputs, save, "--load", str(save), "--eval-iters", "0")
    resume[resume.index("--train-iters") + 1] = str(saved + 2)
    output = run(resume, nproc=2)
    assert f"resuming at step {saved}" in output
    assert read_tracker(save) == str(saved + 2)
    assert {saved + 1, saved + 2} <= set(train_losses(save))


def user_error(argv, capsys) -> str:
    """The message of a run that must fail on its input: exit status 2, one line on stderr."""
    from router_upcycling.train.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_missing_data_files_are_a_one_line_error(inputs, tmp_path, capsys):
    flags = train_flags(inputs, tmp_path / "run")
    flags[flags.index("--data-path") + 1] = str(tmp_path / "absent_text_document")
    assert "dataset file not found" in user_error(flags, capsys)
    assert not (tmp_path / "run").exists()


def test_missing_checkpoint_is_a_one_line_error(inputs, tmp_path, capsys):
    flags = train_flags(inputs, tmp_path / "run")
    flags[flags.index("--pretrained-checkpoint") + 1] = str(tmp_path / "absent")
    assert "checkpoint folder not found" in user_error(flags, capsys)


def test_bad_blend_and_foreign_save_folder_are_refused(inputs, straight_run, tmp_path, capsys):
    flags = train_flags(inputs, tmp_path / "run")
    flags[flags.index("--data-path") + 1: flags.index("--data-path") + 2] = ["heavy", inputs["data"]]
    assert "alternate weights and prefixes" in user_error(flags, capsys)
    before = open(os.path.join(straight_run, "metrics.jsonl")).read()
    assert "already holds checkpoints" in user_error(train_flags(inputs, straight_run), capsys)
    assert open(os.path.join(straight_run, "metrics.jsonl")).read() == before


def from_scratch_flags(inputs, save, *extra) -> list:
    flags = train_flags(inputs, save, "--eval-iters", "0", *extra)
    flags[flags.index("--pretrained-checkpoint"):flags.index("--pretrained-checkpoint") + 2] = [
        "--from-scratch", "--model-config", inputs["dense"]]
    return flags


def test_from_scratch_locmoe_trains_with_its_locality_loss(inputs, tmp_path):
    """LocMoE's parameter-free GrAP router with a locality loss strong enough to steer training, on 1 rank and
    on 2 tensor-parallel ranks with sequence parallelism (each holds half of a micro-batch's tokens): the locality
    loss is logged every step and is the micro-batch's on every layout, so both runs learn alike."""
    records = {}
    for layout, nproc, extra in (("one rank", 1, []), ("tp2", 2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"])):
        save = tmp_path / layout.replace(" ", "_")
        flags = from_scratch_flags(inputs, save, "--moe-router-type", "locmoe", "--locmoe-locality-coeff", "10", *extra)
        flags[flags.index("--train-iters") + 1] = "3"
        assert "locality loss" in run(flags, nproc=nproc)
        assert json.loads(open(os.path.join(save, "router_upcycling.json")).read())["moe"]["router"] == "locmoe"
        records[layout] = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]
    for one, tp in zip(records["one rank"], records["tp2"], strict=True):
        assert 0 < one["locality_loss"] < 0.1 and one["load_balancing_loss"] > 0, one
        assert abs(one["locality_loss"] - tp["locality_loss"]) < 1e-6, (one, tp)
        assert abs(one["grad_norm"] - tp["grad_norm"]) < 1e-4 and abs(one["lm_loss"] - tp["lm_loss"]) < 1e-5, (one, tp)
    assert [r["step"] for r in records["tp2"]] == [1, 2, 3]


def test_locmoe_flags_that_cannot_apply_are_refused(inputs, tmp_path, capsys):
    flags = from_scratch_flags(inputs, tmp_path / "run", "--moe-router-type", "locmoe", "--num-experts", "6")
    error = user_error(flags, capsys)
    assert "--num-experts 6: " in error and "hidden size 64" in error and "expert counts that work: 2, 4, 8, 16, 32, 64" in error
    flags = train_flags(inputs, tmp_path / "run", "--locmoe-locality-coeff", "0.1")
    assert "applies to the locmoe router only; this model's router is mor" in user_error(flags, capsys)
    assert "must be at least 0" in user_error(from_scratch_flags(inputs, tmp_path / "run", "--locmoe-locality-coeff", "-1"), capsys)
    assert not (tmp_path / "run").exists()


def test_bad_config_key_fails_in_the_real_cli_without_traceback(inputs, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("seq-length: 32\nlearning_rate: 0.1\n")
    result = subprocess.run([sys.executable, "-m", "router_upcycling.train", "--config", str(config),
                             *train_flags(inputs, tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: config {config}: unknown key 'learning_rate' (keys are this command's flag names)"
    assert "Traceback" not in result.stderr


GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_tiny_mor_losses.json")


def test_losses_match_the_committed_golden_curve(straight_run):
    """Silent numeric drift (router math, init, data order, loss) fails here. Regenerate deliberately with
    UPDATE_GOLDEN=1 after a change meant to alter the numbers, and say why in the commit."""
    losses = {str(step): loss for step, loss in train_losses(straight_run).items()}
    if os.environ.get("UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump(losses, f, indent=1)
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert golden.keys() == losses.keys()
    for step, loss in losses.items():
        assert abs(loss - golden[step]) <= 2e-3, (step, loss, golden[step])
