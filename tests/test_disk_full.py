"""A full disk (ENOSPC, in this process or in megatron-core's writer processes): one line that says the disk is full
and where, nothing half-written left, and for training the previous checkpoint stays the resume point. The writes
go to a small tmpfs (the suite runs as root on CI; skipped where mounting is not allowed)."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from router_upcycling.testing import PUBLISHED_GEOMETRIES, SAMPLE_TEXT, make_dense_model

REPO = Path(__file__).resolve().parents[1]
CONVERT = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
sys.path.insert(0, str(REPO / "tests" / "train"))


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip() or 'not root'}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def assert_disk_full(result, disk: Path):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the disk is full: writing") and str(disk) in line, line


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    dense = make_dense_model(str(root / "dense"), PUBLISHED_GEOMETRIES["Qwen2.5-0.5B"], intermediate_size=256)
    subprocess.run([*CONVERT, "upcycle", "--hf-model", dense, "--output", str(root / "moe"), "--router", "linear",
                    "--num-experts", "4", "--dtype", "fp32"], check=True, capture_output=True)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{SAMPLE_TEXT[i % 6]} {i}"}) + "\n" for i in range(20000)))
    return {"root": root, "dense": dense, "checkpoint": str(root / "moe"), "corpus": str(corpus)}


def test_upcycle_export_and_preprocess_on_a_full_disk(inputs, tmp_path):
    with small_disk(tmp_path / "disk", "4m") as disk:
        result = subprocess.run([*CONVERT, "upcycle", "--hf-model", inputs["dense"], "--output", str(disk / "moe"),
                                 "--router", "linear", "--num-experts", "4", "--dtype", "fp32"], capture_output=True, text=True)
        assert_disk_full(result, disk)
        assert os.listdir(disk) == []
        result = subprocess.run([*CONVERT, "export", "--checkpoint", inputs["checkpoint"], "--output", str(disk / "hf"),
                                 "--format", "mor", "--dtype", "fp32"], capture_output=True, text=True)
        assert_disk_full(result, disk)
        assert os.listdir(disk) == []
    with small_disk(tmp_path / "small", "256k") as disk:  # the tokenized corpus is about 1 MB
        result = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", inputs["corpus"],
                                 "--tokenizer-model", inputs["dense"], "--output-prefix", str(disk / "data"),
                                 "--no-progress"], capture_output=True, text=True)
        assert_disk_full(result, disk)
        assert os.listdir(disk) == []


def test_a_training_save_that_fills_the_disk_keeps_the_previous_checkpoint(tmp_path):
    from training_runs import make_inputs, run, train_flags

    inputs = make_inputs(tmp_path / "inputs")
    reference = tmp_path / "reference"
    flags = train_flags(inputs, reference, "--save-interval", "2", "--eval-iters", "0")
    flags[flags.index("--train-iters") + 1] = "2"
    run(flags)
    one_checkpoint = sum(f.stat().st_size for f in (reference / "iter_0000002").iterdir())
    others = sum(f.stat().st_size for f in reference.rglob("*") if f.is_file()) - one_checkpoint
    with small_disk(tmp_path / "disk", str(int(others + 1.6 * one_checkpoint))) as disk:
        save = disk / "run"
        flags = train_flags(inputs, save, "--save-interval", "2", "--eval-iters", "0")
        flags[flags.index("--train-iters") + 1] = "4"
        output = run(flags, expect_ok=False)
        last = output.strip().splitlines()[-1]
        assert "the disk is full: writing" in last and str(save / "iter_0000004") in last, output[-3000:]
        assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"
        assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000002"]
