"""`python -m router_upcycling.train` on CPU, launched as users do (python -m, torchrun): learning, exact
resume, SIGTERM checkpoints, data-parallel equivalence and bad input. Tiny model: d=64, 2 layers, 4 experts, seq 32."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from router_upcycling.convert.upcycle import CalibrationSettings, upcycle
from router_upcycling.mcore.checkpoint import read_tracker, resolve_iteration_dir
from router_upcycling.mcore.model import MoESettings
from router_upcycling.testing import SAMPLE_TEXT, make_dense_qwen2

VENV_BIN = os.path.dirname(sys.executable)
STEPS = 12


def write_token_documents(prefix: str, num_docs: int = 200, seed: int = 0) -> None:
    """An indexed dataset of short arithmetic token sequences (learnable), each ended by EOD (id 0)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(num_docs):
        length, start, stride = int(rng.integers(10, 80)), int(rng.integers(1, 200)), int(rng.integers(1, 5))
        builder.add_item(torch.tensor([(start + i * stride) % 200 + 1 for i in range(length)] + [0]))
        builder.end_document()
    builder.finalize(prefix + ".idx")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_inputs")
    dense = make_dense_qwen2(str(root / "dense"), num_heads=8, num_kv_heads=8, tied=True, seed=1)
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXT))
    checkpoint = upcycle(dense, str(root / "moe"), MoESettings(router="mor", num_experts=4, topk=2, num_routers=4),
                         CalibrationSettings(files=[str(calib)], tokens=200, seq_length=16), dtype="fp32", progress=False)
    write_token_documents(str(root / "tokens_text_document"))
    return {"dense": dense, "checkpoint": checkpoint, "data": str(root / "tokens_text_document"), "root": root}


def train_flags(inputs, save, *extra) -> list:
    return ["--pretrained-checkpoint", inputs["checkpoint"], "--data-path", inputs["data"], "--save", str(save),
            "--data-cache-path", str(inputs["root"] / "cache"), "--device", "cpu", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(STEPS), "--log-interval", "1",
            "--eval-interval", "6", "--eval-iters", "1", "--lr", "3e-3", "--lr-warmup-iters", "1", "--split", "90,10,0",
            *extra]


def launch(flags, nproc: int = 1, **popen):
    if nproc == 1:
        command = [sys.executable, "-m", "router_upcycling.train", *flags]
    else:
        command = [os.path.join(VENV_BIN, "torchrun"), "--nproc-per-node", str(nproc), "-m", "router_upcycling.train", *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def run(flags, nproc: int = 1) -> str:
    process = launch(flags, nproc)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


def train_losses(save) -> dict:
    with open(os.path.join(save, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["lm_loss"] for r in records if "lm_loss" in r}


@pytest.fixture(scope="module")
def straight_run(inputs, tmp_path_factory):
    save = tmp_path_factory.mktemp("straight") / "run"
    run(train_flags(inputs, save))
    return save


def test_straight_run_learns_and_writes_the_folder_contract(straight_run):
    losses = train_losses(straight_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.5
    assert read_tracker(straight_run) == str(STEPS)
    assert os.path.isfile(os.path.join(resolve_iteration_dir(straight_run), "train_state", "common.pt"))
    metadata = json.loads(open(os.path.join(straight_run, "router_upcycling.json")).read())
    assert metadata["moe"]["router"] == "mor"
    assert metadata["training"] == {"iteration": STEPS, "consumed_tokens": STEPS * 8 * 32}
    assert os.path.isfile(os.path.join(straight_run, "tokenizer", "tokenizer.json"))
    records = [json.loads(line) for line in open(os.path.join(straight_run, "metrics.jsonl"))]
    step = next(r for r in records if r.get("step") == 3 and "lm_loss" in r)
    for key in ("lr", "grad_norm", "tokens_per_sec", "load_balancing_loss", "z_loss"):
        assert key in step
    shares = torch.tensor(step["expert_token_share"])
    assert shares.shape == (2, 4) and torch.allclose(shares.sum(-1), torch.ones(2), atol=1e-3)
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]


def test_exit_interval_then_resume_equals_straight_run(inputs, straight_run, tmp_path):
    save = tmp_path / "run"
    output = run(train_flags(inputs, save, "--load", str(save), "--exit-interval", "6"))
    assert "stopping at step 6" in output and read_tracker(save) == "6"
    output = run(train_flags(inputs, save, "--load", str(save)))
    assert "resuming at step 6" in output
    straight, resumed = train_losses(straight_run), train_losses(save)
    for step in range(7, STEPS + 1):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-4)


def test_two_ranks_learn_like_one_rank_with_the_same_global_batch(inputs, straight_run, tmp_path):
    save = tmp_path / "run"
    output = run(train_flags(inputs, save), nproc=2)
    assert "2 data-parallel ranks x 2 micro-batches" in output
    one_rank, two_ranks = train_losses(straight_run), train_losses(save)
    for step in range(1, STEPS + 1):
        assert two_ranks[step] == pytest.approx(one_rank[step], abs=1e-4)


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
    from router_upcycling.train.trainer import main

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
