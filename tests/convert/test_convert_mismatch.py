"""Models that do not belong together are refused in one line before any model work: a tokenizer with more tokens
than the model's vocabulary (upcycle's calibration, the analyses), and `verify` against a dense model that is not the
checkpoint's source."""
import json
import os
import subprocess
import sys

import pytest

from router_upcycling.testing import SAMPLE_TEXT, make_dense_qwen2
from test_convert_cli import TOOL, assert_user_error


def convert(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("mismatch")
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXT))
    return root, str(calib)


def test_upcycle_refuses_a_tokenizer_larger_than_the_vocabulary(workspace):
    root, calib = workspace
    dense = make_dense_qwen2(str(root / "small-vocab"), vocab_size=128)  # the tokenizer has 414 tokens
    result = convert("upcycle", "--hf-model", dense, "--output", root / "out", "--num-experts", 4,
                     "--calib-data", calib, "--calib-tokens", 64, "--calib-seq-length", 16)
    assert_user_error(result, f"{dense}: its tokenizer has 414 tokens but the model only 128 embeddings")
    assert not os.path.exists(root / "out")


def test_verify_names_what_differs_from_the_recorded_source(workspace):
    root, _ = workspace
    source = make_dense_qwen2(str(root / "source"), num_layers=2)
    other = make_dense_qwen2(str(root / "other"), num_layers=3)
    result = convert("upcycle", "--hf-model", source, "--output", root / "moe", "--num-experts", 4, "--router", "linear",
                     "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    result = convert("verify", "--hf-model", other, "--checkpoint", root / "moe")
    assert_user_error(result, f"--hf-model {other} is not the dense model --checkpoint {root / 'moe'} was upcycled from "
                              f"({source}): ", "num_hidden_layers 2 recorded vs 3")


def test_analysis_refuses_a_tokenizer_larger_than_the_vocabulary(workspace, capsys):
    from router_upcycling.analyze.__main__ import main

    root, calib = workspace
    model = make_dense_qwen2(str(root / "analysed"), vocab_size=128)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["load", "--model", model, "--data", calib, "--output", str(root / "load"), "--device", "cpu"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: {model}: its tokenizer has 414 tokens but the model only 128 "
                                               "embeddings; the tokenizer belongs to another model")


@pytest.mark.parametrize("tolerance", ["-1", "nan", "0"])
def test_verify_tolerance_must_be_a_positive_number(workspace, tolerance):
    root, _ = workspace
    result = convert("verify", "--hf-model", root / "none", "--checkpoint", root / "none", "--tolerance", tolerance)
    assert_user_error(result, f"--tolerance must be a positive number, got {float(tolerance)}")


def test_calibration_chunks_stop_at_the_model_s_positions(workspace):
    root, calib = workspace
    dense = make_dense_qwen2(str(root / "short"))  # max_position_embeddings 256
    result = convert("upcycle", "--hf-model", dense, "--output", root / "short-moe", "--num-experts", 4,
                     "--calib-data", calib, "--calib-tokens", 300, "--calib-seq-length", 100000, "--dtype", "fp32")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "calibration chunks of 256 tokens, the model's max_position_embeddings" in result.stderr
    metadata = json.loads((root / "short-moe" / "router_upcycling.json").read_text())
    assert metadata["calibration"]["seq_length"] == 256


@pytest.mark.parametrize("device,message", [
    ("cuda", "--device cuda: this machine has 0 CUDA devices"), ("bogus", "--device bogus: not a torch device"),
])
def test_a_device_this_machine_lacks_is_one_line(device, message):
    from router_upcycling.errors import UserError
    from router_upcycling.hf.loading import usable_device

    assert usable_device(None) == "cpu" and usable_device("cpu") == "cpu"
    with pytest.raises(UserError, match=message):
        usable_device(device)
