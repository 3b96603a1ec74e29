"""Helpers for the Megatron-LM trainer tests: `python -m router_upcycling.megatron_lm` launched as users launch it
(torchrun), on the tiny model and data of tests/train/training_runs.py."""
import os
import re
import signal
import subprocess
import sys

import pytest

VENV_BIN = os.path.dirname(sys.executable)
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([0-9.E+-]+)")
GRAD_NORM = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| grad norm: ([0-9.]+)")


def megatron_lm_flags(inputs, save, *extra, iters: int = 6) -> list:
    return ["--pretrained-checkpoint", inputs["checkpoint"], "--load", str(save), "--save", str(save),
            "--data-path", inputs["data"], "--data-cache-path", str(inputs["root"] / "cache"), "--split", "90,10,0",
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(iters),
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "1", "--lr-decay-style", "cosine", "--lr-decay-iters", "6",
            "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1", "--save-interval", "1000",
            "--seed", "1", "--moe-aux-loss-coeff", "0.01", "--weight-decay", "0.1", "--adam-beta2", "0.95", *extra]


def run_megatron_lm(flags, nproc: int = 1, expect_ok: bool = True, torchrun: bool = True) -> str:
    """The launcher's output; torchrun (as on a cluster), or one plain process (`torchrun=False`)."""
    launcher = ([os.path.join(VENV_BIN, "torchrun"), "--standalone", "--nproc-per-node", str(nproc)] if torchrun
                else [sys.executable])
    command = [*launcher, "-m", "router_upcycling.megatron_lm", *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert (process.returncode == 0) == expect_ok, output[-4000:]
    return output


def losses(output: str) -> dict:
    """Iteration -> training loss, from Megatron-LM's log lines. Megatron-LM logs the first iteration of every start
    without resetting its accumulators (training.py, training_log: `should_reset`), so with --log-interval 1 the
    second iteration after a start reads as the mean of the two."""
    return {int(it): float(value) for it, value in LOSS.findall(output)}


def grad_norms(output: str) -> dict:
    return {int(it): float(value) for it, value in GRAD_NORM.findall(output)}


def has_training_layer() -> bool:
    import importlib.util

    return importlib.util.find_spec("megatron.training") is not None


needs_training_layer = pytest.mark.skipif(not has_training_layer(), reason="megatron.training ships with megatron-core "
                                          ">= 0.17 (the 0.19 matrix: make test-latest)")
