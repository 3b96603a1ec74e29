"""tools/convert_checkpoint.py as users run it: bad input gets one line, a non-zero exit, and leaves nothing."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from router_upcycling.testing import SAMPLE_TEXT, make_dense_qwen2

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "convert_checkpoint.py")


def convert(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, timeout=300)


def assert_user_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    dense = make_dense_qwen2(str(root / "dense"), num_heads=8, num_kv_heads=2, seed=7)
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXT))
    return root, dense, str(calib)


def leftovers(root):
    return sorted(p for p in os.listdir(root) if p.startswith(".") or p == "out")


def test_upcycle_then_verify_from_the_command_line(workspace):
    root, dense, calib = workspace
    out = root / "good"
    result = convert("upcycle", "--hf-model", dense, "--output", out, "--num-experts", 4, "--num-routers", 8,
                     "--calib-data", calib, "--calib-tokens", 256, "--calib-seq-length", 32, "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    result = convert("verify", "--hf-model", dense, "--checkpoint", out, "--tolerance", 1e-4)
    assert result.returncode == 0, result.stderr
    assert "top-1 agreement = 100.00%" in result.stdout and "OK" in result.stdout


def test_locmoe_expert_count_must_divide_the_hidden_size(workspace):
    root, dense, _ = workspace
    result = convert("upcycle", "--hf-model", dense, "--output", root / "out", "--router", "locmoe", "--num-experts", 6)
    assert_user_error(result, "--num-experts 6", "hidden size 64", "expert counts that work: 2, 4, 8, 16, 32, 64")
    assert leftovers(root) == []


def test_help_explains_every_flag():
    result = convert("upcycle", "--help")
    for flag in ("--hf-model", "--num-experts", "--topk", "--router", "--num-routers", "--router-aggregation",
                 "--calib-data", "--calib-json-key", "--calib-tokens", "--calib-seq-length", "--calib-batch-size",
                 "--dtype", "--seed", "--force"):
        assert flag in result.stdout


def test_missing_model_folder(workspace):
    root, _, calib = workspace
    assert_user_error(convert("upcycle", "--hf-model", root / "nope", "--output", root / "out", "--router", "linear"),
                      "model folder not found")
    assert leftovers(root) == []


def test_unsupported_architecture(workspace):
    root, dense, _ = workspace
    other = root / "gpt2"
    shutil.copytree(dense, other)
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (other / "config.json").write_text(json.dumps(config))
    assert_user_error(convert("upcycle", "--hf-model", other, "--output", root / "out", "--router", "linear"),
                      "GPT2LMHeadModel", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM")
    assert leftovers(root) == []


def test_router_count_not_covered(workspace):
    root, dense, calib = workspace
    result = convert("upcycle", "--hf-model", dense, "--output", root / "out", "--num-experts", 8, "--num-routers", 3,
                     "--calib-data", calib)
    assert_user_error(result, "--num-routers 3", "router counts that work")
    assert leftovers(root) == []


def test_query_norm_inside_needs_a_qk_norm_model(workspace):
    root, dense, calib = workspace
    result = convert("upcycle", "--hf-model", dense, "--output", root / "out", "--calib-data", calib,
                     "--router-qk-norm", "inside")
    assert_user_error(result, "--router-qk-norm inside", "needs a model with query/key norms")
    assert leftovers(root) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_safetensors(workspace, damage):
    root, dense, _ = workspace
    broken = root / f"broken_{damage}"
    shutil.copytree(dense, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00\x01garbage" * 100)
    assert_user_error(convert("upcycle", "--hf-model", broken, "--output", root / "out", "--router", "linear"),
                      "model.safetensors")
    assert leftovers(root) == []


def test_missing_calibration_file(workspace):
    root, dense, _ = workspace
    assert_user_error(convert("upcycle", "--hf-model", dense, "--output", root / "out", "--num-experts", 8,
                              "--calib-data", root / "missing.jsonl"), "missing.jsonl")
    assert leftovers(root) == []


def test_empty_calibration_file(workspace):
    root, dense, _ = workspace
    empty = root / "empty.jsonl"
    empty.write_text("")
    assert_user_error(convert("upcycle", "--hf-model", dense, "--output", root / "out", "--num-experts", 8,
                              "--calib-data", empty), "empty.jsonl")
    assert leftovers(root) == []


def test_mor_without_calibration_data(workspace):
    root, dense, _ = workspace
    assert_user_error(convert("upcycle", "--hf-model", dense, "--output", root / "out"), "--calib-data")


@pytest.mark.parametrize("topk", [0, 5])
def test_topk_out_of_range(workspace, topk):
    root, dense, _ = workspace
    assert_user_error(convert("upcycle", "--hf-model", dense, "--output", root / "out", "--router", "linear",
                              "--num-experts", 4, "--topk", topk), "--topk")
    assert leftovers(root) == []


def test_existing_output_needs_force_and_is_left_untouched(workspace):
    root, dense, _ = workspace
    existing = root / "existing"
    existing.mkdir()
    (existing / "precious.txt").write_text("keep me")
    assert_user_error(convert("upcycle", "--hf-model", dense, "--output", existing, "--router", "linear",
                              "--num-experts", 4), "--force")
    assert os.listdir(existing) == ["precious.txt"]
    result = convert("upcycle", "--hf-model", dense, "--output", existing, "--router", "linear", "--num-experts", 4, "--force")
    assert result.returncode == 0, result.stderr
    assert "precious.txt" not in os.listdir(existing) and "router_upcycling.json" in os.listdir(existing)


def test_verify_missing_checkpoint(workspace):
    root, dense, _ = workspace
    assert_user_error(convert("verify", "--hf-model", dense, "--checkpoint", root / "nothing"), "not found")
