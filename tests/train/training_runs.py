"""Helpers for the training tests: a tiny upcycled model and token data, and `router_upcycling.train`
launched as users launch it (python -m, or torchrun for several ranks).

Tiny model: d=64, 2 layers, 8 heads, 4 experts top-2 (MoR, 4 routers), seq 32, global batch 8.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

VENV_BIN = os.path.dirname(sys.executable)
STEPS = 12


def make_inputs(root) -> dict:
    from router_upcycling.convert.upcycle import CalibrationSettings, upcycle
    from router_upcycling.settings.moe import MoESettings
    from router_upcycling.testing import SAMPLE_TEXT, make_dense_qwen2, write_token_documents

    dense = make_dense_qwen2(str(root / "dense"), num_heads=8, num_kv_heads=8, tied=True, seed=1)
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXT))
    checkpoint = upcycle(dense, str(root / "moe"), MoESettings(router="mor", num_experts=4, topk=2, num_routers=4),
                         CalibrationSettings(files=[str(calib)], tokens=200, seq_length=16), dtype="fp32", progress=False)
    write_token_documents(str(root / "tokens_text_document"))
    return {"dense": dense, "checkpoint": checkpoint, "data": str(root / "tokens_text_document"), "root": root}


def train_flags(inputs, save, *extra) -> list:
    return ["--pretrained-checkpoint", inputs["checkpoint"], "--data-path", inputs["data"], "--save", str(save),
            "--data-cache-path", str(inputs["root"] / "cache"), "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(STEPS), "--log-interval", "1",
            "--eval-interval", "6", "--eval-iters", "1", "--lr", "3e-3", "--lr-warmup-iters", "1", "--split", "90,10,0",
            *extra]


def launch(flags, nproc: int = 1, **popen):
    if nproc == 1:
        command = [sys.executable, "-m", "router_upcycling.train", *flags]
    else:
        command = [os.path.join(VENV_BIN, "torchrun"), "--standalone", "--nproc-per-node", str(nproc),
                   "-m", "router_upcycling.train", *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def run(flags, nproc: int = 1, expect_ok: bool = True) -> str:
    process = launch(flags, nproc, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # a hung run (torchrun and its ranks) must not outlive its test
        process.communicate()
        raise
    if expect_ok:
        assert process.returncode == 0, output[-3000:]
    else:
        assert process.returncode != 0, output[-3000:]
    return output


def train_losses(save) -> dict:
    with open(os.path.join(save, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["lm_loss"] for r in records if "lm_loss" in r}


def copy_rewound(run_dir, destination, iteration: int):
    """A copy of a run's --save folder as it stood after `iteration` (a checkpoint it saved): the tracker
    names that checkpoint and metrics.jsonl (when the trainer wrote one) ends there, so resuming the copy redoes
    the later steps."""
    shutil.copytree(run_dir, destination)
    (destination / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    metrics = destination / "metrics.jsonl"
    if not metrics.is_file():  # Megatron-LM's trainer logs to stdout only
        return destination
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= iteration]
    metrics.write_text("".join(line + "\n" for line in kept))
    return destination


def max_difference(losses: dict, reference: dict, steps) -> float:
    return max(abs(losses[step] - reference[step]) for step in steps)
