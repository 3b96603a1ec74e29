"""SIGTERM (Slurm's scancel, a time limit, preemption) and SIGINT in the middle of every command that writes: it
stops its worker processes (megatron-core's checkpoint writers among them), removes its staging folder, keeps the
previous output, and exits 128 + the signal with one line. Training saves and exits instead (tests/train)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from router_upcycling.testing import PUBLISHED_GEOMETRIES, SAMPLE_TEXT, make_dense_model

REPO = Path(__file__).resolve().parents[1]
CONVERT = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A dense model large enough that writing its checkpoint takes a moment, calibration text, an upcycled
    checkpoint and a corpus to tokenize."""
    root = tmp_path_factory.mktemp("signals")
    dense = make_dense_model(str(root / "dense"), PUBLISHED_GEOMETRIES["Qwen2.5-1.5B"], intermediate_size=512)
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXT * 20))
    subprocess.run([*CONVERT, "upcycle", "--hf-model", dense, "--output", str(root / "moe"), "--router", "linear",
                    "--num-experts", "4", "--dtype", "fp32"], check=True, capture_output=True)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{t} {i}"}) + "\n" for i in range(30000) for t in SAMPLE_TEXT[:1]))
    return {"root": root, "dense": dense, "calib": str(calib), "checkpoint": str(root / "moe"), "corpus": str(corpus)}


def staging_entries(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def stop_when(command, ready, signum, timeout=180):
    """Start `command`, send `signum` once `ready()` holds; (exit status, stderr, the descendants it had then)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"finished before it could be stopped: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "never reached the point to stop it at"
        time.sleep(0.02)
    descendants = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr, descendants


def assert_stopped(status, stderr, descendants, signum):
    assert status == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    # the last line (after a progress bar's own, which has no newline of its own)
    assert stderr.rstrip().endswith(f"stopped by {signal.Signals(signum).name}: nothing half-written was left behind")
    assert stderr.count("stopped by") == 1, stderr[-3000:]  # said by the command, not again by a forked worker
    time.sleep(0.5)
    survivors = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not survivors, f"orphaned worker processes: {[p.cmdline() for p in survivors]}"


def test_upcycle_stopped_while_writing_leaves_nothing_and_keeps_the_old_output(inputs, tmp_path):
    output = tmp_path / "moe"
    output.mkdir()
    (output / "keep.txt").write_text("the previous output")
    command = [*CONVERT, "upcycle", "--hf-model", inputs["dense"], "--output", str(output), "--num-experts", "4",
               "--calib-data", inputs["calib"], "--calib-tokens", "512", "--calib-seq-length", "64", "--force"]

    def writing():  # the checkpoint writer has started on the staging folder
        return any((tmp_path / name / "release").is_dir() for name in staging_entries(tmp_path))

    assert_stopped(*stop_when(command, writing, signal.SIGTERM), signal.SIGTERM)
    assert staging_entries(tmp_path) == [] and os.listdir(output) == ["keep.txt"]


def test_export_stopped_while_writing_leaves_nothing(inputs, tmp_path):
    command = [*CONVERT, "export", "--checkpoint", inputs["checkpoint"], "--output", str(tmp_path / "hf"), "--format",
               "mor", "--dtype", "fp32"]
    assert_stopped(*stop_when(command, lambda: staging_entries(tmp_path), signal.SIGTERM), signal.SIGTERM)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_preprocess_stopped_while_tokenizing_leaves_nothing(inputs, tmp_path, signum):
    command = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", inputs["corpus"],
               "--tokenizer-model", inputs["dense"], "--output-prefix", str(tmp_path / "data"), "--workers", "2",
               "--log-interval", "100"]
    assert_stopped(*stop_when(command, lambda: staging_entries(tmp_path), signum), signum)
    assert os.listdir(tmp_path) == []


def test_analyze_stopped_mid_run_writes_nothing(inputs, tmp_path):
    hf = tmp_path / "hf"
    subprocess.run([*CONVERT, "export", "--checkpoint", inputs["checkpoint"], "--output", str(hf), "--format", "mor",
                    "--dtype", "fp32"], check=True, capture_output=True)
    log = tmp_path / "started"
    command = [sys.executable, "-m", "router_upcycling.analyze", "specialization", "--model", str(hf), "--data",
               inputs["corpus"], "--output", str(tmp_path / "analysis"), "--max-tokens", "200000"]
    started = time.monotonic()
    status, stderr, descendants = stop_when(command, lambda: time.monotonic() - started > 8 or log.exists(), signal.SIGTERM)
    assert_stopped(status, stderr, descendants, signal.SIGTERM)
    assert sorted(os.listdir(tmp_path)) == ["hf"]
