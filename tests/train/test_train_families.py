"""Qwen3 (QK-norm, head dim != hidden / heads) and Llama 3 (llama3 RoPE scaling) models upcycled, trained on 2 ranks
and exported: the families' megatron-core layers train like one rank (the per-head query/key norms' gradients
reduced over tensor parallelism), and the trained checkpoint exports to mor and to the family's stock MoE, which
evaluation and analysis read."""
import json
import os
import subprocess
import sys

import pytest

from router_upcycling.testing import SAMPLE_TEXT, Geometry, make_dense_model, write_token_documents
from training_runs import max_difference, run, train_losses

STEPS = 4
TINY = {"qwen3": Geometry("qwen3", 64, 8, 4, 16, tied=True),
        "llama": Geometry("llama", 64, 8, 4, 8, tied=False, rope_theta=500000.0, llama3_rope_factor=32.0)}


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    from router_upcycling.convert.upcycle import CalibrationSettings, upcycle
    from router_upcycling.settings.moe import MoESettings

    root = tmp_path_factory.mktemp("families")
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXT))
    write_token_documents(str(root / "tokens_text_document"))
    checkpoints = {}
    for family, geometry in TINY.items():
        dense = make_dense_model(str(root / f"{family}-dense"), geometry, seed=3)
        checkpoints[family] = upcycle(dense, str(root / f"{family}-moe"), MoESettings(num_experts=4, num_routers=4),
                                      CalibrationSettings(files=[str(calib)], tokens=200, seq_length=16), dtype="fp32",
                                      progress=False)
    return root, checkpoints


def train(root, checkpoint, save, nproc, *layout):
    return run(["--pretrained-checkpoint", checkpoint, "--data-path", str(root / "tokens_text_document"),
                "--save", str(save), "--data-cache-path", str(root / "cache"), "--seq-length", "32",
                "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(STEPS), "--log-interval", "1",
                "--eval-iters", "0", "--lr", "3e-3", "--lr-warmup-iters", "1", "--split", "90,10,0", *layout], nproc=nproc)


def test_qwen3_trains_with_tensor_parallel_query_key_norms_like_one_rank(upcycled, tmp_path):
    root, checkpoints = upcycled
    train(root, checkpoints["qwen3"], tmp_path / "one", 1)
    train(root, checkpoints["qwen3"], tmp_path / "tp2", 2, "--tensor-model-parallel-size", "2", "--sequence-parallel")
    one, tp2 = train_losses(tmp_path / "one"), train_losses(tmp_path / "tp2")
    assert sorted(tp2) == list(range(1, STEPS + 1)) and max_difference(tp2, one, range(1, STEPS + 1)) < 1e-3


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_family_trains_on_two_ranks_and_exports(upcycled, tmp_path, family):
    from router_upcycling.convert.export import export

    from router_upcycling.eval.sample_data import write_sample_mirror

    root, checkpoints = upcycled
    save = tmp_path / "run"
    train(root, checkpoints[family], save, 2, "--expert-model-parallel-size", "2")
    mirror = tmp_path / "mirror"
    write_sample_mirror(str(mirror), rows_per_split=6)
    assert sorted(train_losses(save)) == list(range(1, STEPS + 1))
    for fmt in ("mor", "stock"):
        folder = export(str(save), str(tmp_path / fmt), fmt, dtype="fp32")
        architecture = json.loads(open(os.path.join(folder, "config.json")).read())["architectures"][0]
        assert architecture == {("qwen3", "mor"): "Qwen3MoRForCausalLM", ("qwen3", "stock"): "Qwen3MoeForCausalLM",
                                ("llama", "mor"): "LlamaMoRForCausalLM", ("llama", "stock"): "MixtralForCausalLM"}[family, fmt]
        # evaluation and analysis take every format
        result = subprocess.run([sys.executable, "-m", "router_upcycling.eval", "--model", folder, "--tasks", "copa",
                                 "--data-dir", str(mirror), "--limit", "4"], capture_output=True, text=True)
        assert result.returncode == 0 and "COPA" in result.stdout, result.stderr[-2000:]
        result = subprocess.run([sys.executable, "-m", "router_upcycling.analyze", "health", "--model", folder, "--data",
                                 str(root / "calib.jsonl"), "--output", str(tmp_path / f"health-{fmt}")],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads((tmp_path / f"health-{fmt}" / "health.json").read_text())["layers"] == [0, 1]
